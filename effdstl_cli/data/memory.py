"""In-memory splits (digits, synthetic, mnist, fashion-mnist, cifar10/100, npz:PATH): every image in
one tensor; ``get_batch`` gathers and augments a whole batch on the device, drawing randomness only
from the generator it is given, so every student of a group sees identical batches and a run is
reproducible from (seed, epoch) alone. CIFAR's pad-crop + flip has a fixed number of variants per
sample, which the teacher cache keys its stored logits by.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import EffdstlError

_U8_TO_UNIT = torch.arange(256, dtype=torch.float32) / 255  # uint8 -> [0, 1], as the CPU rounds it

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
