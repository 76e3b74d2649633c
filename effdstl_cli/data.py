"""Datasets by name -> splits of (image, label, index) in pixel space.

Every split yields float32 CHW images in [0, 1]. Normalization (mean/std) lives in the model
wrapper (models.Net), so the FGSM probe can step and clip in pixel space and timm/torchvision
pretrained weights see the normalization they were trained with.

Two kinds of split:
- in-memory (digits, synthetic, mnist, fashion-mnist, cifar10/100, npz:PATH): all images in one
  tensor; ``get_batch`` gathers and augments a whole batch on the device, drawing randomness only
  from the generator it is given, so every student of a group sees identical batches and a run is
  reproducible from (seed, epoch) alone.
- on-disk (folder:PATH, imagenet:PATH): ImageFolder trees, decoded either with PIL per sample
  (DataLoader workers: ``__getitem__``; or ``get_batch``) or as a batch on the device
  (``MixedView`` for the workers, which read the bytes, then ``decode_batch``: nvJPEG and one
  batched resample on a GPU). ``get_batch`` and ``decode_batch`` draw the same crops from the same generator.
"""

from __future__ import annotations

import gzip
import math
import os
import socket
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .config import DATA_KEYS, data_keys
from .errors import EffdstlError, unknown

DATASETS = ("digits", "synthetic", "mnist", "fashion-mnist", "cifar10", "cifar100",
            "npz:PATH", "folder:PATH", "imagenet:PATH")
_PATH_KINDS = ("npz", "folder", "imagenet")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Per-channel statistics the models normalize with. digits/synthetic keep raw pixels (identity):
# the measured digits triplets in docs/METHOD.md feed the MLPs pixel/16 unnormalized.
_STATS = {
    "identity": ((0.0,), (1.0,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_U8_TO_UNIT = torch.arange(256, dtype=torch.float32) / 255  # uint8 -> [0, 1], as the CPU rounds it
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def online(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    """Whether a download from ``host`` can start: False at once under EFFDSTL_OFFLINE=1.

    A cheap TCP connect (to the proxy when one is set) run in a thread, so a hanging DNS lookup
    cannot stall us past ``timeout``; this replaces library retry loops that take ~50 s offline.
    """
    if os.environ.get("EFFDSTL_OFFLINE", "") not in ("", "0"):
        return False
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or 80
    ok: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


# -- splits --------------------------------------------------------------------------------

CROP_PAD = 4                                  # CIFAR pad-crop: offsets 0..2*pad per axis
CROP_FLIP_VARIANTS = (2 * CROP_PAD + 1) ** 2 * 2  # 9 x 9 offsets x 2 flips = 162 images per sample


def _crop_flip(x: torch.Tensor, generator: torch.Generator | None, pad: int = CROP_PAD,
               return_variant: bool = False):
    """Batched random crop (zero padding ``pad``) + horizontal flip, as one gather on x's device.

    Random numbers come from ``generator`` on its own device, then move to x's device, so a CPU
    generator gives the same crops whether the batch lives on the CPU or a GPU.
    ``return_variant`` also returns each row's variant id ``(oy * (2 pad + 1) + ox) * 2 + flip``
    (int64, on the generator's device; 0 .. 2 (2 pad + 1)^2 - 1), the key of the teacher cache.
    """
    b, _, h, w = x.shape
    gdev = generator.device if generator is not None else torch.device("cpu")
    oy_g = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev)
    ox_g = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev)
    flip_g = torch.randint(0, 2, (b,), generator=generator, device=gdev)
    oy, ox, flip = oy_g.to(x.device), ox_g.to(x.device), flip_g.to(x.device).bool()
    xp = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C), zeros outside
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = oy[:, None] + ar_h
    cols = ox[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # a flip reads columns backwards
    out = xp[torch.arange(b, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    out = out.permute(0, 3, 1, 2).contiguous()
    if return_variant:
        return out, (oy_g * (2 * pad + 1) + ox_g) * 2 + flip_g
    return out


class TensorSplit(Dataset):
    """An in-memory split: ``images`` (N, C, H, W), uint8 (0-255) or float (already in [0, 1])."""

    in_memory = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, train: bool, augment: str = "none"):
        if len(images) != len(labels):
            raise EffdstlError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.contiguous()
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.train = train
        self.augment = augment if train else "none"   # 'crop_flip' (CIFAR family) or 'none'
        self._on_device: dict[tuple, torch.Tensor] = {}  # (device, tensor id) -> its copy there

    def __len__(self) -> int:
        return len(self.images)

    def images_on(self, device, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """``self.images`` (or another CPU ``tensor``) on ``device``, copied there only once."""
        tensor = self.images if tensor is None else tensor
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev == tensor.device:
            return tensor
        key = (str(dev), id(tensor))
        if key not in self._on_device:
            self._on_device[key] = tensor.to(dev)
        return self._on_device[key]

    @property
    def num_variants(self) -> int:
        """How many distinct augmented images one sample can become (1: augmentation off)."""
        return CROP_FLIP_VARIANTS if self.train and self.augment == "crop_flip" else 1

    def get_batch(self, idx: torch.Tensor, generator: torch.Generator | None = None, device="cpu",
                  augment: bool | None = None, return_variant: bool = False):
        """Images ``idx`` as float (B, C, H, W) in [0, 1] on ``device``.

        ``augment`` defaults to ``self.train``; pass False for clean training images (probes).
        With augmentation on and ``generator`` None the global RNG is used (DataLoader path).
        ``return_variant`` returns ``(x, variant)`` instead: each row's augmentation variant id
        (int64 on the CPU, in ``range(num_variants)``; all 0 when not augmented). It draws
        nothing extra, so the images are the same either way.
        """
        src = self.images_on(device)
        ix = torch.as_tensor(idx, dtype=torch.long)
        x = src[ix.to(src.device)]
        variant = None
        if (self.train if augment is None else augment) and self.augment == "crop_flip":
            x, variant = _crop_flip(x, generator, return_variant=True)
        if x.dtype != torch.uint8:
            x = x.float()
        elif x.is_cpu:
            x = x.float().div_(255)
        else:
            # CUDA divides by a scalar as a multiply by its reciprocal, which differs from x/255 in
            # the last bit for half the values; a table of the CPU's quotients keeps batches identical
            x = self.images_on(x.device, _U8_TO_UNIT)[x.int()]
        if not return_variant:
            return x
        if variant is None:
            variant = torch.zeros(len(ix), dtype=torch.long)
        return x, variant.cpu()

    def __getitem__(self, i: int):
        return self.get_batch(torch.tensor([i]))[0], int(self.labels[i]), i


class BadImage(EffdstlError):
    """An image file of a folder dataset that cannot be decoded."""


SKIP_BAD_IMAGES = False                    # --skip-bad-images (set by launch.TrainJob in the job's process)
_SKIPPED: dict[str, list[str]] = {}        # dataset spec -> the files left out in this process


def skipped_images(spec: str) -> list[str]:
    """The undecodable files ``--skip-bad-images`` left out of dataset ``spec`` in this process."""
    return list(_SKIPPED.get(str(spec), []))


def _bad_image(path: str, exc: BaseException) -> BadImage:
    why = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return BadImage(f"image {path} cannot be decoded ({type(exc).__name__}: {why}); replace or delete it, "
                    "or pass --skip-bad-images to leave such files out (they are counted in final.json)")


class _Probe(Dataset):
    """Decodes one file fully (PIL) in a worker: '' when fine, else why not."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> str:
        from PIL import Image

        try:
            with Image.open(self.samples[i][0]) as im:
                im.convert("RGB")
            return ""
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
            return str(_bad_image(self.samples[i][0], exc))


class FolderSplit(Dataset):
    """An ImageFolder split: PIL per sample, or batches decoded on the device (ImageNet-style transforms, no jitter)."""

    in_memory = False

    def __init__(self, samples: list[tuple[str, int]], train: bool, image_size: int):
        self.samples = samples
        self.labels = torch.tensor([y for _, y in samples], dtype=torch.long)
        self.train = train
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def read_bytes(self, i: int) -> torch.Tensor:
        """The raw encoded file (for a GPU-decode path)."""
        return torch.frombuffer(bytearray(Path(self.samples[i][0]).read_bytes()), dtype=torch.uint8)

    def _open(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.samples[i][0]) as im:
                return im.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise _bad_image(self.samples[i][0], exc) from None

    def check(self, workers: int | None = None) -> list[tuple[int, str]]:
        """Decode every file once (PIL, in parallel workers): [(index, one-line reason)] of the bad ones."""
        n = workers if workers is not None else min(os.cpu_count() or 1, 8)
        loader = torch.utils.data.DataLoader(_Probe(self.samples), batch_size=64, num_workers=n if len(self) > 256 else 0,
                                             collate_fn=list)
        out, base = [], 0
        for batch in loader:
            out += [(base + k, why) for k, why in enumerate(batch) if why]
            base += len(batch)
        return out

    def without(self, drop: set[int]) -> "FolderSplit":
        return FolderSplit([smp for k, smp in enumerate(self.samples) if k not in drop], self.train, self.image_size)

    def _pil(self, im, crop, flip: bool, uint8: bool = False) -> torch.Tensor:
        import torchvision.transforms.functional as TF

        s = self.image_size
        if crop is None:  # evaluation: resize the shorter side to s*256/224, centre crop s
            im = TF.center_crop(TF.resize(im, round(s * 256 / 224), antialias=True), [s, s])
        else:  # RandomResizedCrop(s) + RandomHorizontalFlip only (docs/METHOD.md: no colour jitter)
            top, left, h, w = crop
            im = TF.resized_crop(im, top, left, h, w, [s, s], antialias=True)
            im = TF.hflip(im) if flip else im
        return TF.pil_to_tensor(im) if uint8 else TF.to_tensor(im)

    def load(self, i: int, generator: torch.Generator | None = None, augment: bool | None = None,
             epoch_key: int | None = None, uint8: bool = False) -> torch.Tensor:
        """One sample with PIL; see ``get_batch`` for where a training sample's crop and flip come from."""
        return self.get_batch(torch.tensor([i]), generator, augment=augment, epoch_key=epoch_key, uint8=uint8)[0]

    def get_batch(self, idx: torch.Tensor, generator: torch.Generator | None = None, device="cpu",
                  augment: bool | None = None, epoch_key: int | None = None, uint8: bool = False) -> torch.Tensor:
        """Decode ``idx`` with PIL. Training crops and flips are keyed by (``epoch_key``, sample
        index) when a key is given (what the engine does: the same crop in any worker, batch or
        process, and in ``decode_batch``), else drawn for the batch from ``generator`` (global RNG
        if None) as ``decode_batch`` draws them. ``uint8``: 0..255 uint8 instead of float in [0, 1]."""
        ims = [self._open(int(i)) for i in idx]
        if self.train if augment is None else augment:
            keys = None if epoch_key is None else sample_keys(epoch_key, idx)
            crops, flips = augment_params([(im.width, im.height) for im in ims], generator, keys=keys)
            out = [self._pil(im, c, f, uint8) for im, c, f in zip(ims, crops.tolist(), flips.tolist())]
        else:
            out = [self._pil(im, None, False, uint8) for im in ims]
        return torch.stack(out).to(device)

    def __getitem__(self, i: int):
        return self.load(i), int(self.labels[i]), i

    # -- the device-decode path: workers read bytes, the device decodes and augments ------------

    def decode_batch(self, datas: list[torch.Tensor], generator: torch.Generator | None = None,
                     device="cpu", augment: bool | None = None, idx=None,
                     epoch_key: int | None = None) -> torch.Tensor:
        """Encoded files -> float (B, 3, s, s) in [0, 1] on ``device``, decoded and transformed there.

        JPEGs are decoded as one batch by ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on a
        GPU, libjpeg on the CPU: the same code either way). Training images get
        RandomResizedCrop(s) + horizontal flip with the crops and flips ``get_batch`` gives: keyed
        by (``epoch_key``, ``idx``) when a key is given, else drawn from ``generator``; others the
        evaluation transform (resize to s*256/224, centre crop). Both are
        one batched resample (``resize_windows``) whatever the batch size: per-image Python work
        and kernel launches here would hold the interpreter and the GPU queue that the training
        step needs (the side thread of ``engine._decoded`` runs this while the step runs). Output
        is rounded to 8-bit levels, like PIL's.
        """
        try:
            imgs = decode_images(datas, device)
        except RuntimeError as exc:  # name the file (one by one on the CPU to find it)
            for k, d in enumerate(datas):
                try:
                    decode_images([d], "cpu")
                except RuntimeError as one:
                    where = self.samples[int(idx[k])][0] if idx is not None else f"image {k} of the batch"
                    raise _bad_image(where, one) from None
            raise exc
        crops = flips = None
        if self.train if augment is None else augment:
            keys = None if epoch_key is None else sample_keys(epoch_key, idx)
            crops, flips = augment_params([(im.shape[2], im.shape[1]) for im in imgs], generator, keys=keys)
        if imgs[0].device.type != "cpu" and _BATCHED_RESIZE_FAILED:
            x = resize_each(imgs, crops, self.image_size, flips)
        else:
            try:
                x = resize_windows(imgs, crops, self.image_size, flips)
            except (torch.cuda.OutOfMemoryError, *_STICKY_ERRORS):  # not a missing kernel: no fallback
                raise
            except (RuntimeError, NotImplementedError) as exc:
                if imgs[0].device.type == "cpu":  # the tested path: a failure here is a bug, show it
                    raise
                # a device/PyTorch build without the nested-tensor or batched-matmul kernels this
                # needs: say so once and resize image by image (same numbers, slower)
                _BATCHED_RESIZE_FAILED.append(f"{type(exc).__name__}: {exc}")
                warnings.warn(f"batched resize failed on {imgs[0].device} ({_BATCHED_RESIZE_FAILED[0]}); "
                              "resizing image by image from now on", RuntimeWarning, stacklevel=2)
                x = resize_each(imgs, crops, self.image_size, flips)
        return x.round_().clamp_(0, 255).div_(255)


class KeyedView(Dataset):
    """PIL in the workers with keyed crops: ``(float image, label, index)``, the same whatever the
    number of workers (a worker's own RNG never enters)."""

    def __init__(self, split: FolderSplit, epoch_key: int | None, augment: bool | None = None):
        self.split, self.epoch_key, self.augment = split, epoch_key, augment

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.split.load(i, augment=self.augment, epoch_key=self.epoch_key), int(self.split.labels[i]), i


class MixedView(Dataset):
    """Items ``(index, on_cpu)``: a worker decodes an ``on_cpu`` sample with PIL (uint8, keyed crop)
    and only reads the others' bytes, which the device then decodes (``decode_mixed``). Splitting
    each batch between the CPU cores and the GPU's decoder adds their rates."""

    def __init__(self, split: FolderSplit, epoch_key: int | None, augment: bool | None = None):
        self.split, self.epoch_key, self.augment = split, epoch_key, augment

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item):
        i, on_cpu = item
        if on_cpu:
            return self.split.load(i, augment=self.augment, epoch_key=self.epoch_key, uint8=True), int(self.split.labels[i]), i
        return self.split.read_bytes(i), int(self.split.labels[i]), i


def mixed_batches(batches: list[list[int]], cpu_share: float, epoch_key: int | None) -> list[list[tuple[int, bool]]]:
    """``MixedView`` items ``(index, on_cpu)``: each sample goes to PIL with probability
    ``cpu_share``, decided by its key, so which decoder a sample meets (they differ by resampling
    rounding) does not depend on its batch, its position or the DDP rank that handles it."""
    if cpu_share <= 0:
        return [[(i, False) for i in b] for b in batches]
    flat = [i for b in batches for i in b]
    u = keyed_uniforms(sample_keys(epoch_key or 0, flat), 24)[:, 23]  # past augment_params' 23 numbers
    on_cpu = iter((u < cpu_share).tolist())
    return [[(i, next(on_cpu)) for i in b] for b in batches]


def collate_mixed(batch):
    """DataLoader collate for MixedView: (PIL uint8 images (k, 3, s, s) or None, their positions,
    encoded files, their positions, labels (B,), indices (B,))."""
    pil = [k for k, (x, _, _) in enumerate(batch) if x.dim() == 3]
    enc = [k for k, (x, _, _) in enumerate(batch) if x.dim() != 3]
    ys = torch.tensor([y for _, y, _ in batch], dtype=torch.long)
    idx = torch.tensor([i for _, _, i in batch], dtype=torch.long)
    x_pil = torch.stack([batch[k][0] for k in pil]) if pil else None
    return x_pil, torch.tensor(pil, dtype=torch.long), [batch[k][0] for k in enc], torch.tensor(enc, dtype=torch.long), ys, idx


def decode_mixed(split: FolderSplit, item, device, augment: bool | None = None,
                 epoch_key: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``collate_mixed`` batch -> (float (B, 3, s, s) in [0, 1] on ``device`` in batch order, labels, indices)."""
    x_pil, pos_pil, datas, pos_enc, y, idx = item
    if x_pil is None:  # all on the device: no scatter
        return split.decode_batch(datas, None, device, augment, idx, epoch_key), y.to(device, non_blocking=True), idx
    s = split.image_size
    x = torch.empty(len(idx), 3, s, s, device=device)
    dev_pos = pos_pil.to(device, non_blocking=True)
    x[dev_pos] = x_pil.to(device, non_blocking=True).float().div_(255)
    if datas:
        x[pos_enc.to(device, non_blocking=True)] = split.decode_batch(datas, None, device, augment, idx[pos_enc], epoch_key)
    return x, y.to(device, non_blocking=True), idx


def decode_images(datas: list[torch.Tensor], device="cpu") -> list[torch.Tensor]:
    """Encoded images -> uint8 RGB (3, H, W) tensors on ``device``; JPEGs in one batched call there.

    Other formats (PNG, ...) and JPEGs the device decoder refuses (CMYK, say) are decoded on the
    CPU and moved.
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    dev = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(datas)
    jpg = [k for k, d in enumerate(datas) if len(d) > 2 and int(d[0]) == 0xFF and int(d[1]) == 0xD8]
    if jpg:
        try:
            dec = decode_jpeg([datas[k] for k in jpg], mode=ImageReadMode.RGB, device=dev)
        except RuntimeError:
            if dev.type == "cpu":
                raise
            dec = [None] * len(jpg)  # decode those on the CPU below
        for k, im in zip(jpg, dec):
            out[k] = im
    for k, im in enumerate(out):
        if im is None:
            out[k] = decode_image(datas[k], mode=ImageReadMode.RGB).to(dev, non_blocking=True)
    return out


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


_BATCHED_RESIZE_FAILED: list[str] = []  # set once resize_windows failed on a device (see decode_batch)
_STICKY_ERRORS = tuple(e for e in (getattr(torch, "AcceleratorError", None),) if e is not None)  # CUDA errors


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


@dataclass
class Data:
    name: str
    family: str             # digits | synthetic | mnist | cifar | imagenet
    num_classes: int
    classes: list[str]
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: TensorSplit | FolderSplit
    test: TensorSplit | FolderSplit


# -- builders --------------------------------------------------------------------------------

def check_dataset_spec(spec: str) -> None:
    """Raise the one-line error for a misspelt dataset spec (no file is read: cheap, for planning)."""
    spec = str(spec).strip()
    kind, colon, arg = spec.partition(":")
    kind = kind.lower()
    if kind in _PATH_KINDS:
        if not arg:
            raise EffdstlError(f"dataset '{spec}' needs a path: {kind}:PATH")
    elif colon or kind not in DATASETS:
        raise unknown("dataset", spec, DATASETS)


def data_args(cfg: dict) -> dict:
    """``build_data``'s arguments for a run config (its ``config.data_keys``)."""
    d = data_keys(cfg)
    return {"spec": d["dataset"], "data_root": d["data_root"], "image_size": d["image_size"],
            **{k: d[k] for k in DATA_KEYS[3:] if k in d}}


def data_for(cfg: dict, augment: bool = True) -> "Data":
    """The data of a run config."""
    return build_data(**data_args(cfg), augment=augment)


def per_class_subset(labels: torch.Tensor, n: int, num_classes: int, what: str, seed: int = 0) -> torch.Tensor:
    """Indices of a stratified, seeded subset: ``n`` samples of every class (sorted, so the
    subset keeps the split's order). One fixed draw per dataset (seed 0): every run of every study
    sees the same images. A class with fewer than ``n`` is one clear error."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    counts = torch.bincount(labels, minlength=num_classes)
    if int(counts.min()) < n:
        c = int(counts.argmin())
        raise EffdstlError(f"{what}_per_class={n} but class {c} has only {int(counts[c])} {what} images")
    g = torch.Generator().manual_seed(seed)
    keep = [torch.nonzero(labels == c).flatten()[torch.randperm(int(counts[c]), generator=g)[:n]]
            for c in range(num_classes)]
    return torch.cat(keep).sort().values


def _subset(split, idx: torch.Tensor):
    if isinstance(split, FolderSplit):
        return FolderSplit([split.samples[int(i)] for i in idx], split.train, split.image_size)
    return TensorSplit(split.images[idx], split.labels[idx], split.train, split.augment)


def build_data(spec: str, data_root: str | None = None, image_size: int | None = None,
               augment: bool = True, train_per_class: int | None = None,
               test_per_class: int | None = None) -> Data:
    """A dataset by spec (see DATASETS). ``augment=False`` turns training augmentation off;
    ``*_per_class``: a stratified, seeded subset of that split (``per_class_subset``)."""
    spec = str(spec).strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    check_dataset_spec(spec)
    if kind == "folder" or kind == "imagenet":
        data = _folder(spec, Path(arg).expanduser(), int(image_size or 224))
    else:
        data = {"digits": _digits, "synthetic": _synthetic, "npz": lambda: _npz(spec, Path(arg).expanduser()),
                "mnist": lambda: _mnist(kind, data_root), "fashion-mnist": lambda: _mnist(kind, data_root),
                "cifar10": lambda: _cifar(kind, data_root), "cifar100": lambda: _cifar(kind, data_root)}[kind]()
        if image_size is not None and int(image_size) != data.image_size:
            raise EffdstlError(f"image_size={image_size} applies to folder/imagenet datasets only; "
                               f"{spec} images are {data.image_size}x{data.image_size} (set image_size: null)")
    for what, n in (("train", train_per_class), ("test", test_per_class)):
        if n is not None:
            split = getattr(data, what)
            setattr(data, what, _subset(split, per_class_subset(split.labels, int(n), data.num_classes, what)))
    if not augment:
        data.train.augment = "none"
        if isinstance(data.train, FolderSplit):
            data.train.train = False
    return data


def _in_memory(name, family, classes, stats, xtr, ytr, xte, yte, augment="none") -> Data:
    """Data from (N, C, H, W) tensors; labels checked against the class list."""
    for split, y in (("train", ytr), ("test", yte)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise EffdstlError(f"{name}: {split} labels span {int(y.min())}..{int(y.max())} "
                               f"but there are {len(classes)} classes")
    return Data(name=name, family=family, num_classes=len(classes), classes=list(classes),
                in_chans=xtr.shape[1], image_size=xtr.shape[2], mean=stats[0], std=stats[1],
                train=TensorSplit(xtr, ytr, True, augment), test=TensorSplit(xte, yte, False))


def _digits() -> Data:
    """scikit-learn digits (embedded, offline): 8x8 grey, pixel/16; fixed stratified 1078/719 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.4, stratify=d.target, random_state=0)
    return _in_memory("digits", "digits", [str(c) for c in range(10)], _STATS["identity"],
                      x[tr], y[tr], x[te], y[te])


def _synthetic(seed: int = 0, n_train: int = 2000, n_test: int = 500, sigma: float = 0.6) -> Data:
    """10 noisy class prototypes, 1x8x8: fast, deterministic (numpy PCG64), learnable, not trivial.

    With sigma 0.6 a 64-16-10 MLP reaches ~85% test in a few epochs and a 256-256 MLP ~92%.
    """
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 1, (10, 64))

    def draw(n):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = np.clip(protos[y] + rng.normal(0, sigma, (n, 64)), 0, 1)
        return torch.tensor(x, dtype=torch.float32).view(n, 1, 8, 8), torch.tensor(y, dtype=torch.long)

    (xtr, ytr), (xte, yte) = draw(n_train), draw(n_test)
    return _in_memory("synthetic", "synthetic", [f"class{c}" for c in range(10)], _STATS["identity"],
                      xtr, ytr, xte, yte)


def _default_root(data_root: str | None) -> Path:
    return Path(data_root or os.environ.get("EFFDSTL_DATA") or "data").expanduser()


def _torchvision(cls, kind: str, root: Path, host: str, cure: str):
    """(train, test) torchvision datasets from ``root``, downloading them only when online."""
    try:
        return cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError:
        pass  # not there (or corrupt): try a download
    if not online(host):
        raise EffdstlError(f"{kind} is not under {root} and cannot be downloaded (offline?): {cure}")
    try:
        return cls(str(root), train=True, download=True), cls(str(root), train=False, download=True)
    except Exception as exc:  # network errors come in many types
        raise EffdstlError(f"{kind} could not be downloaded into {root} ({type(exc).__name__}: {exc}); {cure}")


def _cifar(kind: str, data_root: str | None) -> Data:
    import torchvision.datasets as tvd

    root = _default_root(data_root)
    cure = (f"run once online so torchvision downloads it into {root} (or copy torchvision's "
            f"cifar-10-batches-py there), or use your own copy as npz:PATH (uint8 x_train/y_train/"
            f"x_test/y_test) or folder:PATH (an ImageFolder with train/ and val/)")
    cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
    tr, te = _torchvision(cls, kind, root, "www.cs.toronto.edu", cure)
    as_t = lambda a: torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return _in_memory(kind, "cifar", tr.classes, _STATS[kind], as_t(tr.data), torch.tensor(tr.targets),
                      as_t(te.data), torch.tensor(te.targets), augment="crop_flip")


def _mnist(kind: str, data_root: str | None) -> Data:
    import torchvision.datasets as tvd

    root = _default_root(data_root)
    if kind == "fashion-mnist":
        cls, host = tvd.FashionMNIST, "fashion-mnist.s3-website.eu-central-1.amazonaws.com"
        tv_dir = root / "FashionMNIST" / "raw"
        has_tv = tv_dir.is_dir() and any(tv_dir.iterdir())
        if not has_tv and (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").exists():
            # the Debian package: offline, no torchvision layout needed
            xtr, ytr, xte, yte = (torch.from_numpy(_read_idx(DEBIAN_FASHION / f)) for f in (
                "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
            return _in_memory(kind, "mnist", FASHION_CLASSES, _STATS[kind], xtr[:, None].contiguous(),
                              ytr.long(), xte[:, None].contiguous(), yte.long())
        cure = f"apt-get install dataset-fashion-mnist, or put the torchvision files under {root}"
    else:
        cls, host = tvd.MNIST, "ossci-datasets.s3.amazonaws.com"
        cure = f"put the torchvision files under {root} (MNIST/raw/*-ubyte)"
    tr, te = _torchvision(cls, kind, root, host, cure)
    return _in_memory(kind, "mnist", list(tr.classes), _STATS[kind], tr.data[:, None].contiguous(),
                      tr.targets.long(), te.data[:, None].contiguous(), te.targets.long())


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not, of unsigned bytes."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    ndim, code = raw[3] if len(raw) > 3 else 0, raw[2] if len(raw) > 2 else 0
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    if code != 0x08 or ndim == 0 or len(raw) != 4 + 4 * ndim + int(np.prod(dims)):
        raise EffdstlError(f"{path} is not a complete IDX file of unsigned bytes (truncated or corrupt?)")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _npz(spec: str, path: Path) -> Data:
    """uint8 x_train/x_test (N,H,W,C) or (N,H,W), integer y_train/y_test, optional classes."""
    if not path.is_file():
        raise EffdstlError(f"npz file {path} does not exist (an npz holds uint8 x_train, y_train, x_test, "
                           f"y_test; for CIFAR-10 without one, use dataset cifar10: torchvision downloads it)")
    try:
        z = np.load(path, allow_pickle=False)
        keys = set(z.files)
    except Exception as exc:
        raise EffdstlError(f"npz file {path} cannot be read ({type(exc).__name__}: {exc}); is it truncated?")
    need = ("x_train", "y_train", "x_test", "y_test")
    missing = [k for k in need if k not in keys]
    if missing:
        raise EffdstlError(f"npz file {path} lacks {', '.join(missing)} (has: {', '.join(sorted(keys)) or 'nothing'}); "
                           f"expected uint8 x_train (N,H,W,C), y_train (N,), x_test, y_test")
    arr = {}
    try:
        for k in need + (("classes",) if "classes" in keys else ()):
            arr[k] = z[k]
    except Exception as exc:
        raise EffdstlError(f"npz file {path}: key '{k}' cannot be read ({type(exc).__name__}: {exc})")
    for k in ("x_train", "x_test"):
        a = arr[k]
        if a.dtype != np.uint8 or a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[3] not in (1, 3)):
            raise EffdstlError(f"npz file {path}: {k} has shape {a.shape} and dtype {a.dtype}; "
                               f"expected uint8 (N,H,W,C) with C 1 or 3, or (N,H,W)")
        if a.ndim == 3:
            arr[k] = a[..., None]
    if arr["x_train"].shape[1:] != arr["x_test"].shape[1:]:
        raise EffdstlError(f"npz file {path}: x_train images are {arr['x_train'].shape[1:]} but x_test's "
                           f"are {arr['x_test'].shape[1:]}")
    for s in ("train", "test"):
        y, n = arr[f"y_{s}"], len(arr[f"x_{s}"])
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise EffdstlError(f"npz file {path}: y_{s} has shape {y.shape} and dtype {y.dtype}; expected integer (N,)")
        if len(y) != n:
            raise EffdstlError(f"npz file {path}: y_{s} has {len(y)} labels but x_{s} has {n} images")
        if n == 0:
            raise EffdstlError(f"npz file {path}: x_{s} is empty")
    classes = _npz_classes(path, arr)
    xtr = torch.from_numpy(arr["x_train"]).permute(0, 3, 1, 2).contiguous()
    xte = torch.from_numpy(arr["x_test"]).permute(0, 3, 1, 2).contiguous()
    c = xtr.shape[1]
    return _in_memory(spec, "cifar" if c == 3 else "mnist", classes, _channel_stats(xtr),
                      xtr, torch.from_numpy(arr["y_train"]).long(), xte, torch.from_numpy(arr["y_test"]).long(),
                      augment="crop_flip" if c == 3 else "none")


def _npz_classes(path: Path, arr: dict) -> list[str]:
    """The class names: the file's ``classes`` (then N = its length and labels must lie in 0..N-1),
    else 0..N-1 from the labels, which must then be exactly 0..N-1 with every class in the train
    split (a stray label 255 would build a 256-class model; a class only in the test split cannot be
    learned)."""
    ytr, yte = arr["y_train"], arr["y_test"]
    lo = int(min(ytr.min(), yte.min()))
    if "classes" in arr:
        classes = [str(c) for c in np.asarray(arr["classes"]).reshape(-1)]
        hi = int(max(ytr.max(), yte.max()))
        if lo < 0 or hi >= len(classes):
            raise EffdstlError(f"npz file {path}: labels run from {lo} to {hi} but 'classes' names {len(classes)} "
                               f"classes (labels must be 0..{len(classes) - 1})")
        return classes
    present = np.unique(ytr)
    n = int(present.max()) + 1
    if lo < 0 or len(present) != n:
        gaps = sorted(set(range(max(n, 0))) - set(int(v) for v in present))
        raise EffdstlError(f"npz file {path}: train labels are not 0..N-1 with every class present (labels "
                           f"{int(present.min())}..{int(present.max())}, {len(present)} distinct"
                           + (f", missing {', '.join(map(str, gaps[:5]))}{' ...' if len(gaps) > 5 else ''}" if gaps else "")
                           + "); relabel them, or add a 'classes' array naming all N classes")
    extra = sorted(set(int(v) for v in np.unique(yte)) - set(range(n)))
    if extra:
        raise EffdstlError(f"npz file {path}: test labels {', '.join(map(str, extra[:5]))} never occur in the "
                           f"train split ({n} classes: 0..{n - 1}); a class only in the test split cannot be "
                           "learned (add a 'classes' array to say N if that is meant)")
    return [str(c) for c in range(n)]


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 (N, C, H, W) in [0, 1] units, in chunks (no full float copy)."""
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for chunk in x.split(4096):
        f = chunk.double().div_(255)
        s += f.sum((0, 2, 3))
        s2 += f.square().sum((0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(max(v, 1e-3), 4) for v in std.tolist())


def _folder(spec: str, root: Path, image_size: int) -> Data:
    """An ImageFolder tree: ROOT/train/<class>/* and ROOT/val/<class>/* (or ROOT/test/...)."""
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (or test/)"
    if not root.is_dir():
        raise EffdstlError(f"dataset folder {root} does not exist ({layout})")
    if not (root / "train").is_dir():
        raise EffdstlError(f"dataset folder {root} has no train/ subfolder; {layout}")
    held = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if held is None:
        raise EffdstlError(f"dataset folder {root} has no val/ or test/ subfolder; {layout}")
    classes, train = _scan(root / "train", None)
    _, test = _scan(held, classes)
    tr, te = FolderSplit(train, True, image_size), FolderSplit(test, False, image_size)
    # The test split is small and read after every epoch: decode it all now, so a bad file is named
    # before any training (not after a whole epoch, on every retry). With --skip-bad-images the
    # train split is checked too and bad files of both are left out (counted in final.json).
    bad_te = te.check()
    if bad_te and not SKIP_BAD_IMAGES:
        raise BadImage(bad_te[0][1] + (f" ({len(bad_te)} bad files in {held.name}/)" if len(bad_te) > 1 else ""))
    if SKIP_BAD_IMAGES:
        bad_tr = tr.check()
        _SKIPPED[str(spec)] = [tr.samples[k][0] for k, _ in bad_tr] + [te.samples[k][0] for k, _ in bad_te]
        tr, te = tr.without({k for k, _ in bad_tr}), te.without({k for k, _ in bad_te})
        if not len(tr) or not len(te):
            raise EffdstlError(f"dataset folder {root}: no decodable image left in {'train' if not len(tr) else held.name}/")
    return Data(name=spec, family="imagenet", num_classes=len(classes), classes=classes, in_chans=3,
                image_size=image_size, mean=_STATS["imagenet"][0], std=_STATS["imagenet"][1], train=tr, test=te)


def _scan(d: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(file, label)]) of one split folder; ``classes`` fixes the labels (test split)."""
    subdirs = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise EffdstlError(f"{d} has no class subfolders (expected {d}/<class>/<image>; "
                           f"ImageNet's flat val/ must first be sorted into class folders)")
    if classes is None:
        classes = subdirs
    extra = sorted(set(subdirs) - set(classes))
    if extra:
        raise EffdstlError(f"{d} has class folder(s) {', '.join(extra[:5])} that the train/ split lacks")
    label = {c: k for k, c in enumerate(classes)}
    samples = []
    for c in subdirs:
        files = sorted(os.path.join(top, f) for top, _, fs in os.walk(d / c, followlinks=True)
                       for f in fs if f.lower().endswith(IMG_EXTENSIONS))
        samples += [(f, label[c]) for f in files]
    if not samples:
        raise EffdstlError(f"{d} holds no images ({' '.join(IMG_EXTENSIONS)}) in its class folders")
    return classes, samples
