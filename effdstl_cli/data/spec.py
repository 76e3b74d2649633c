"""What planning needs of the data package, without torch: the dataset names and their check,
and ``--decode`` (:class:`StreamOptions`). A dry run, ``LaunchOptions.validate`` and
``studies.validate_runs`` import this module only; ``datasets`` and ``stream`` re-export it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import EffdstlError, unknown

DATASETS = ("digits", "synthetic", "mnist", "fashion-mnist", "cifar10", "cifar100",
            "npz:PATH", "folder:PATH", "imagenet:PATH")
_PATH_KINDS = ("npz", "folder", "imagenet")


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


DECODE = ("auto", "device", "workers", "mixed:F")


@dataclass
class StreamOptions:
    """How batches of an on-disk split are read: ``workers`` DataLoader processes; ``gpu_decode``
    (workers read bytes, the device decodes + augments; None: on CUDA only); ``cpu_share`` (with
    device decoding, this fraction of each batch is decoded by PIL in the workers instead, so the
    CPU cores and the GPU's decoder add up). In-memory splits ignore them."""

    workers: int = 4
    gpu_decode: bool | None = None
    cpu_share: float = 0.0

    @staticmethod
    def parse_decode(mode: str) -> tuple[bool | None, float]:
        """``--decode`` -> (gpu_decode, cpu_share); one clear error for anything else."""
        if mode in ("auto", "device", "workers"):
            return {"auto": None, "device": True, "workers": False}[mode], 0.0
        if mode.startswith("mixed:"):
            try:
                f = float(mode.split(":", 1)[1])
            except ValueError:
                f = -1.0
            if 0.0 < f < 1.0:
                return True, f
            raise EffdstlError(f"--decode {mode}: mixed:F needs 0 < F < 1, the share of each batch PIL "
                               "decodes in the workers (e.g. mixed:0.4)")
        raise unknown("--decode mode", mode, DECODE)

    @classmethod
    def from_decode(cls, mode: str, workers: int = 4) -> "StreamOptions":
        gpu_decode, share = cls.parse_decode(mode)
        return cls(workers=workers, gpu_decode=gpu_decode, cpu_share=share)

    def describe(self) -> str:
        """One line for a dry run: who reads and who decodes the images."""
        how = ("decoded on the GPU if there is one, else by PIL in the workers" if self.gpu_decode is None else
               "decoded by PIL in the workers" if not self.gpu_decode else
               "decoded on the device (nvJPEG on a GPU)" if not self.cpu_share else
               f"{self.cpu_share:.0%} of each batch decoded by PIL in the workers, the rest on the device")
        return f"{self.workers} DataLoader workers per process read the files, {how}"

    def device_decode(self, device, split) -> bool:
        """Whether ``split``'s images are decoded on ``device`` (only on-disk splits can be)."""
        if not hasattr(split, "decode_batch"):
            return False
        return self.gpu_decode if self.gpu_decode is not None else device.type == "cuda"
