"""The batched, TF32-exact antialiased resample of decoded images: RandomResizedCrop or the eval
resize + centre crop of a whole batch of differently sized images as a few batched matmuls
(per-image Python and kernel launches would hold the GPU queue the training step needs), equal to
``F.interpolate(antialias=True)`` image by image (``resize_each``, the fallback and the reference).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

RESIZE_CHUNK_PX = 1 << 25  # padded source pixels per resample (x 3 channels x 4 bytes = 400 MB)


def resize_windows(imgs: list[torch.Tensor], crops: torch.Tensor | None, s: int,
                   flips: torch.Tensor | None = None, precrop: bool | None = None,
                   exact: bool | None = None) -> torch.Tensor:
    """uint8 (3, H_i, W_i) images -> float (B, 3, s, s) in 0..255: every image's resize in two matmuls.

    ``crops`` (B, 4) rows ``(top, left, h, w)``: resize that window to s x s (RandomResizedCrop,
    clamping at the window's edge like PIL's ``resized_crop``); None: the evaluation transform
    (resize the shorter side to s*256/224, centre crop s). ``flips`` (B,) mirrors those rows.

    The resize is separable, so image i is ``Wy_i @ X_i @ Wx_i^T`` with ``Wy_i``/``Wx_i`` the
    (s, H)/(s, W) weight matrices of ``F.interpolate(mode="bilinear", antialias=True,
    align_corners=False)`` (PIL's filter too), zero outside the window. With the images
    zero-padded into one tensor that is one batched matmul pair for the whole batch (in chunks of
    at most RESIZE_CHUNK_PX padded pixels, sorted by (h, w), when they are many or large): a fixed
    handful of kernels and no per-image Python beyond reading shapes, where a resize per image
    costs ~2 launches and a dozen interpreter calls per image. On a GPU the whole images are
    padded (they are contiguous, so gathering them is one batched copy, and the dense weights'
    wasted FLOPs are cheap there); on a CPU (``precrop``, default) the windows are cut out first,
    which costs a copy per image but halves the arithmetic. Either way the numbers are the same.
    ``exact`` (default: off the CPU) guards the matmuls against TF32 rounding (``_separable``).
    """
    n = len(imgs)
    dev = imgs[0].device
    if precrop is None:
        precrop = dev.type == "cpu"
    if exact is None:
        exact = dev.type != "cpu"
    if crops is not None and precrop:
        imgs = [im[:, t:t + h, l:l + w] for im, (t, l, h, w) in zip(imgs, crops.tolist())]
    hw = [(int(t.shape[1]), int(t.shape[2])) for t in imgs]
    H, W = torch.tensor(hw, dtype=torch.float64).unbind(1)
    if crops is not None:
        c = crops.to(torch.float64)
        start = torch.zeros(n, 2, dtype=torch.float64) if precrop else c[:, :2]
        length, size = c[:, 2:], torch.full((n, 2), float(s), dtype=torch.float64)
        off = torch.zeros(n, 2, dtype=torch.float64)  # each window becomes s x s
    else:
        geo = torch.tensor([_eval_resize(h, w, s) for h, w in hw], dtype=torch.float64)  # (nh, nw, top, left)
        start, length, size, off = torch.zeros(n, 2, dtype=torch.float64), torch.stack([H, W], 1), geo[:, :2], geo[:, 2:]
    flip = torch.zeros(n, 1, dtype=torch.float64) if flips is None else flips.to(torch.float64)[:, None]
    params = torch.cat([start, length, size, off, flip], 1).float()  # (B, 9) per-image numbers
    order = list(range(n))
    if n * max(h for h, _ in hw) * max(w for _, w in hw) > RESIZE_CHUNK_PX:
        order.sort(key=lambda k: hw[k])  # by (h, w): landscape and portrait images apart
    zs = []
    i = 0
    while i < n:  # the longest run of `order` whose padded batch fits the budget (at least one image)
        j, mh, mw = i, 0, 0
        while j < n:
            h2, w2 = max(mh, hw[order[j]][0]), max(mw, hw[order[j]][1])
            if j > i and (j - i + 1) * h2 * w2 > RESIZE_CHUNK_PX:
                break
            mh, mw, j = h2, w2, j + 1
        ids = order[i:j]
        with warnings.catch_warnings():  # "nested tensors are a prototype": we only pad with them
            warnings.simplefilter("ignore")
            # float before padding: CUDA's to_padded_tensor is one kernel for float, a loop for uint8
            # (it copies its size table to the device with a sync of this stream: once per chunk)
            x = torch.nested.nested_tensor([imgs[k] for k in ids]).float().to_padded_tensor(0.0)
        p = _to(params if len(ids) == n else params[ids], dev)
        wy = _aa_weights(p[:, 0], p[:, 2], p[:, 4], p[:, 6], s, mh)
        wx = _aa_weights(p[:, 1], p[:, 3], p[:, 5], p[:, 7], s, mw)
        wx = torch.where(p[:, 8, None, None] > 0, wx.flip(1), wx)  # a flip reverses the output columns
        zs.append(_separable(x, wy, wx, exact))
        i = j
    if len(zs) == 1:
        return zs[0]
    inv = torch.empty(n, dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(n)
    return torch.cat(zs).index_select(0, _to(inv, dev))


def _to(t: torch.Tensor, dev) -> torch.Tensor:
    """A small CPU tensor to ``dev`` without making the host wait (pinned staging on CUDA)."""
    if torch.device(dev).type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def _tf32_split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t = hi + lo with hi exact in TF32 (10-bit mantissa: fp32's low 13 bits cleared)."""
    hi = (t.view(torch.int32) & ~0x1FFF).view(torch.float32)
    return hi, t - hi


def _separable(x: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor, exact: bool) -> torch.Tensor:
    """(b, 3, H, W) x (b, s, H) x (b, s, W) -> (b, 3, s, s) = wy @ x @ wx^T per image, as two bmm
    with the channels folded in (no broadcast copies of the weights).

    ``exact``: on a GPU the process may run fp32 matmuls in TF32 (the engine turns it on), which
    would round the weights and the intermediate to 10 bits (up to ~0.4 of a level off). The
    pixels (integers <= 255) are exact in TF32; the weights and the intermediate are split into a
    TF32-exact high part and a small low part, and the products summed: error ~1e-3 of a level.
    """
    b, c, hh, ww = x.shape
    s = wy.shape[1]
    xr = x.reshape(b, c * hh, ww)
    if exact:
        hi, lo = _tf32_split(wx.transpose(1, 2).contiguous())
        t = torch.baddbmm(torch.bmm(xr, lo), xr, hi)
    else:
        t = torch.bmm(xr, wx.transpose(1, 2))                                  # (b, 3H, s)
    t = t.reshape(b, c, hh, s).permute(0, 2, 1, 3).reshape(b, hh, c * s)        # (b, H, 3s)
    if exact:
        w_hi, w_lo = _tf32_split(wy)
        t_hi, t_lo = _tf32_split(t)
        z = torch.baddbmm(torch.baddbmm(torch.bmm(w_lo, t_hi), w_hi, t_lo), w_hi, t_hi)
    else:
        z = torch.bmm(wy, t)                                                    # (b, s, 3s)
    return z.reshape(b, s, c, s).permute(0, 2, 1, 3).contiguous()


def resize_each(imgs: list[torch.Tensor], crops: torch.Tensor | None, s: int,
                flips: torch.Tensor | None = None) -> torch.Tensor:
    """``resize_windows`` one image at a time with ``F.interpolate``: the fallback and the reference
    it is measured against (``effdstl bench``); ~2 launches and some Python per image."""
    out = []
    for k, im in enumerate(imgs):
        if crops is not None:
            t, l, h, w = crops[k].tolist()
            z = F.interpolate(im[None, :, t:t + h, l:l + w].float(), size=(s, s), mode="bilinear",
                              antialias=True, align_corners=False)
        else:
            box = _eval_resize(int(im.shape[1]), int(im.shape[2]), s)
            z = F.interpolate(im[None].float(), size=box[:2], mode="bilinear", antialias=True,
                              align_corners=False)[:, :, box[2]:box[2] + s, box[3]:box[3] + s]
        out.append(z.flip(3) if flips is not None and bool(flips[k]) else z)
    return torch.cat(out)


def _eval_resize(h: int, w: int, s: int) -> tuple[int, int, int, int]:
    """(new h, new w, top, left) of resize(shorter side -> s*256/224) + centre crop s, as TF does it."""
    r = round(s * 256 / 224)
    nh, nw = (r, int(r * w / h)) if h <= w else (int(r * h / w), r)
    return nh, nw, int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))


def _aa_weights(start: torch.Tensor, length: torch.Tensor, resized: torch.Tensor, offset: torch.Tensor,
                s: int, n_src: int) -> torch.Tensor:
    """(B, s, n_src) rows of the antialiased bilinear resize along one axis, on the inputs' device.

    Per image: the source window ``[start, start + length)`` is resized to ``resized`` samples, of
    which outputs ``offset .. offset + s - 1`` are kept (a crop after the resize); 0 outside it.
    Same arithmetic as ATen's ``_upsample_bilinear2d_aa`` (and PIL's): centre = scale (o + 0.5),
    support = max(scale, 1), triangle filter stretched by max(scale, 1), taps clipped to the
    window, weights normalised to sum 1 (so clipping at an edge acts as clamping there).
    """
    dev = length.device
    scale = (length / resized)[:, None, None]
    support = scale.clamp(min=1.0)
    centre = scale * (torch.arange(s, device=dev)[None, :, None] + offset[:, None, None] + 0.5)
    lo = torch.trunc(centre - support + 0.5).clamp(min=0)
    hi = torch.minimum(torch.trunc(centre + support + 0.5), length[:, None, None])
    j = torch.arange(n_src, device=dev, dtype=torch.float32)[None, None, :] - start[:, None, None]
    w = (1 - ((j - centre + 0.5) / support).abs()).clamp(min=0)
    w = torch.where((j >= lo) & (j < hi), w, 0.0)
    return w / w.sum(-1, keepdim=True).clamp(min=1e-12)
