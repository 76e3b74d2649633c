"""On-disk splits (folder:PATH, imagenet:PATH): ImageFolder trees, decoded either with PIL per sample
(DataLoader workers: ``__getitem__``; or ``get_batch``) or as a batch on the device (``MixedView``
for the workers, which read the bytes, then ``decode_batch``: nvJPEG and one batched resample on a
GPU). ``get_batch`` and ``decode_batch`` draw the same crops: from the same generator, or keyed by
(epoch key, sample index) so that neither the decoder nor the worker that handles a sample matters.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import EffdstlError
from .keyed import augment_params, keyed_uniforms, sample_keys
from .resample import resize_each, resize_windows

_BATCHED_RESIZE_FAILED: list[str] = []  # set once resize_windows failed on a device (see decode_batch)
_STICKY_ERRORS = tuple(e for e in (getattr(torch, "AcceleratorError", None),) if e is not None)  # CUDA errors


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
