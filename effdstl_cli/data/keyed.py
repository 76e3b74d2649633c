"""Keyed, counter-based randomness: a sample's augmentation drawn from (epoch key, sample index)
alone (splitmix64), so it does not depend on the batch, the DataLoader worker, the decoder or the
DDP rank that handles it; and the RandomResizedCrop + flip parameters of a batch in a few tensor ops.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a well-mixed bijection."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_keys(epoch_key: int, idx) -> np.ndarray:
    """uint64 keys of samples ``idx`` in an epoch: the seed of each sample's augmentation."""
    i = np.asarray(torch.as_tensor(idx).reshape(-1).tolist(), dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix64(np.uint64(epoch_key & 0xFFFF_FFFF_FFFF_FFFF) + (i + np.uint64(1)) * _GOLDEN)


def keyed_uniforms(keys: np.ndarray, n: int) -> torch.Tensor:
    """float64 (B, n) uniforms in [0, 1): a counter-based stream per key (splitmix64), so a
    sample's numbers depend on its key alone, not on which batch, worker or process draws them."""
    k = np.asarray(keys, dtype=np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        x = _mix64(k + np.arange(1, n + 1, dtype=np.uint64)[None, :] * _GOLDEN)
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)


def augment_params(sizes: list[tuple[int, int]], g: torch.Generator | None,
                   scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                   keys: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomResizedCrop + horizontal-flip parameters for a batch of (width, height) images.

    Returns (crops, flips): int64 (B, 4) rows ``(top, left, h, w)`` and bool (B,). The
    distribution is torchvision's ``RandomResizedCrop.get_params`` (up to 10 tries of area ~
    U(scale) * W * H and log-aspect ~ U(log ratio); the first that fits; else the centre crop with
    the nearest allowed aspect) and p = 0.5 flips, drawn without a Python loop per image (it costs
    the same for 8 or 512 images): from ``g`` in three calls per batch, or, given per-sample
    ``keys`` (``sample_keys``), from each sample's own counter-based stream.
    """
    wh = torch.tensor(sizes, dtype=torch.float64).reshape(-1, 2)
    n = len(wh)
    W, H = wh[:, :1], wh[:, 1:]
    if keys is not None:
        r = keyed_uniforms(keys, 23)  # 10 tries x (area, aspect), (top, left), flip
        u, pos, flips = r[:, :20].reshape(n, 10, 2), r[:, 20:22], r[:, 22] < 0.5
    else:
        u = torch.rand((n, 10, 2), generator=g, dtype=torch.float64)
        pos = torch.rand((n, 2), generator=g, dtype=torch.float64)
        flips = torch.rand(n, generator=g) < 0.5
    target = W * H * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, as Python's round()
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits
    w, h = w.gather(1, first), h.gather(1, first)
    top = torch.minimum(torch.floor(pos[:, :1] * (H - h + 1)), H - h)
    left = torch.minimum(torch.floor(pos[:, 1:] * (W - w + 1)), W - w)
    # no try fits: the central crop with the nearest allowed aspect ratio
    r = W / H
    fw = torch.where(r > ratio[1], torch.round(H * ratio[1]), W)
    fh = torch.where(r < ratio[0], torch.round(W / ratio[0]), H)
    miss = ~fits.any(1, keepdim=True)
    h, w = torch.where(miss, fh, h), torch.where(miss, fw, w)
    top = torch.where(miss, torch.div(H - fh, 2, rounding_mode="floor"), top)
    left = torch.where(miss, torch.div(W - fw, 2, rounding_mode="floor"), left)
    return torch.cat([top, left, h, w], 1).long(), flips
