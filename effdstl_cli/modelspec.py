"""Model specs without torch: the names ``models`` builds and the check of a spec, which planning
(``studies.validate_runs``, a dry run) uses; ``models`` re-exports them with the networks.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

from .errors import EffdstlError, unknown

CIFAR_RESNETS = {  # name -> (depth, widths of stem, stage 1, 2, 3)
    **{f"resnet{d}": (d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
WRNS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}
CNNS = {"small": ((16, 32, 64), 1), "medium": ((32, 64, 128), 2), "large": ((64, 128, 256), 2)}
MODELS = ("mlp:H1-H2", "cnn:small", "cnn:medium", "cnn:large", *CIFAR_RESNETS, *WRNS, "timm:NAME", "tv:NAME")


def check_model_spec(spec: str) -> None:
    """Raise the one-line error for a misspelt model spec without building it (cheap, for planning;
    timm/torchvision names are checked when the model is built)."""
    spec = str(spec).strip()
    family, _, arg = spec.partition(":")
    if family == "mlp":
        hidden = [int(h) for h in arg.split("-") if h.isdigit()]
        if not hidden or len(hidden) != len(arg.split("-")) or min(hidden) < 1:
            raise EffdstlError(f"bad MLP spec '{spec}': give hidden widths like mlp:32 or mlp:256-256")
    elif family == "cnn":
        if arg not in CNNS:
            raise unknown("cnn size", arg, CNNS)
    elif not (spec in CIFAR_RESNETS or spec in WRNS or (family in ("timm", "tv") and arg)):
        raise unknown("model", spec, MODELS)


class _SpecOnly(pickle.Unpickler):
    """Unpickles the dict of a ``torch.save`` file with every tensor left out (None): torch's own
    rebuild functions and storage types become no-ops, nothing else may be named (no code runs)."""

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "torch" or module.startswith("torch."):
            return _nothing
        raise pickle.UnpicklingError(f"global {module}.{name}")

    def persistent_load(self, pid):
        return None


def _nothing(*args, **kwargs):
    return None


def read_saved_spec(path: str | Path) -> str | None:
    """The model spec a ``models.save_weights`` file names, read without torch (planning: a dry run
    of ``train student --teacher model.pt``); None whenever this cannot tell (no spec, a foreign,
    damaged or unusual file): then ``models.saved_spec`` reads it with torch and says what is wrong.
    The archive's checksums are verified first, so a damaged file is never taken as readable."""
    try:
        with zipfile.ZipFile(path) as z:
            if z.testzip() is not None:
                return None
            (pkl,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
            obj = _SpecOnly(io.BytesIO(z.read(pkl))).load()
    except Exception:  # noqa: BLE001 - anything unexpected: torch reads it and names the problem
        return None
    spec = obj.get("model_spec") if isinstance(obj, dict) else None
    return spec if isinstance(spec, str) and spec else None
