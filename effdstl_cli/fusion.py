"""Which students fuse, without torch: the ``--fuse`` modes, the policy and the plan a dry run prints.

``fused`` (the fused layers) and ``engine`` (which applies the policy) import torch; planning
(``--dry-run``, ``LaunchOptions.validate``) only needs the names and the rule, so they live here.
"""

from __future__ import annotations

FUSE_MODES = ("auto", "on", "off")


def family(spec: str) -> str:
    """The model family the fusion policy distinguishes: 'mlp' (matmuls only) or 'conv'."""
    return "mlp" if str(spec).startswith("mlp:") else "conv"


def policy(mode: str, spec: str, device_type: str, image_size: int | None = None) -> tuple[bool, str]:
    """Whether ``--fuse mode`` fuses students of ``spec`` on ``device_type``, and why.

    ``auto`` follows what ``effdstl bench`` measures (docs/PERFORMANCE.md): on a CPU fused MLPs win
    (one GEMM instead of K) while grouped convolutions lose to K plain ones. On a GPU small
    students (CIFAR-sized images, MLPs) are launch-bound, which fusion removes (HFTA, MLSys 2021);
    students on ImageNet-sized images are compute-bound and stay in the loop until the bench's
    224 px row (``scripts/gpu-check.sh``) shows fusion winning there.
    """
    if mode == "off":
        return False, "--fuse off"
    if mode == "on":
        return True, "--fuse on"
    if family(spec) == "mlp":
        return True, "auto: MLPs fuse"
    if device_type != "cuda":
        return False, "auto: convolutions loop on the CPU (grouped convolutions are slower there)"
    if image_size is not None and image_size > 64:
        return False, f"auto: {image_size} px convolutions are compute-bound on a GPU; --fuse on to fuse"
    return True, "auto: small convolutional students fuse on a GPU"


def fusion_key(cfg: dict, epoch: int = 0) -> tuple:
    """Students fuse when they share architecture, schedule and optimizer settings (everything of
    their stages but the distiller) and where they are in training."""
    stages = [(s["epochs"], sorted(s["optim"].items()), sorted((s.get("sched") or {}).items()))
              for s in cfg["stages"]]
    return (str(cfg["model"]), bool(cfg.get("pretrained", False)), repr(stages), epoch)


def fusion_plan(cfgs: list[dict], device_type: str, mode: str) -> list[str]:
    """What ``--fuse mode`` does with a group's runs on ``device_type``, one line per set of
    runs that could share a fused model (the dry run prints it; the engine still checks each
    model on a probe batch and loops where it cannot fuse)."""
    sets: dict[tuple, int] = {}
    for c in cfgs:
        sets[fusion_key(c)] = sets.get(fusion_key(c), 0) + 1
    lines = []
    for key, n in sets.items():
        spec = key[0]
        if n < 2:
            continue
        size = cfgs[0].get("image_size") or (224 if str(cfgs[0]["dataset"]).split(":")[0] in ("imagenet", "folder") else 32)
        on, why = policy(mode, spec, device_type, int(size))
        lines.append(f"{n} students of {spec}: " + ("fused into one model" if on else "stepped in a loop") + f" ({why})")
    return lines
