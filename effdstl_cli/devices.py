"""Which torch device a name means: the one resolution for the engine, the probes and the bench.

``auto`` is the current CUDA device when one is visible, else the CPU; an explicit ``cuda`` on a
machine without a GPU is one clear line rather than a CUDA traceback later.
"""

from __future__ import annotations

import torch

from .errors import EffdstlError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EffdstlError("--device cuda asked for, but no CUDA GPU is visible here")
    return dev
