"""Model specs without torch: the names ``models`` builds and the check of a spec, which planning
(``studies.validate_runs``, a dry run) uses; ``models`` re-exports them with the networks.
"""

from __future__ import annotations

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
