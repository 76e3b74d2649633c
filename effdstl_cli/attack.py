"""The FGSM boundary probe (Sec. 4.3, Fig. 7; docs/METHOD.md 'Fig. 7').

From a distillation run (label smoothing on reg AND correct samples, Sec. 4.2), draw up to ``n``
training samples at random (seeded) from those the run kept (never in its altered subset) and up
to ``n`` from those it manipulated, attack them with FGSM using the teacher's gradient, and
record for the teacher, the distilled student and an undistilled network how much the true-class
confidence drops: ``p(x)[y] - p(x_adv)[y]``. Images are in pixel space [0, 1]
(normalization lives inside the models), so the step and the clip need no un-normalizing.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import yaml

from . import files as fio
from .data import data_for
from .devices import resolve_device
from .engine import load_teacher
from .errors import EffdstlError
from .models import load_checkpoint, model_for
from .rundir import RunDir
from .studies import DEFAULT_EPS  # torch-free: the CLI plans probes without importing this module
from .targets import subset_mask, true_prob


def fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """``x_adv = clip(x + eps * sign(grad_x CE(f(x), y)), 0, 1)`` (Goodfellow et al.)."""
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def _load_run_model(run_dir: Path, cfg: dict, data) -> torch.nn.Module:
    path = Path(run_dir) / "model.pt"
    if not path.exists():
        raise EffdstlError(f"run {Path(run_dir).name} has no model.pt: train it first (effdstl sweep/train ...)")
    RunDir(run_dir).require_finished("FGSM probe")  # the seal: finished and intact, as for a teacher
    net = model_for(cfg["model"], data)
    load_checkpoint(net, str(path))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def _probs(net, split, idx: torch.Tensor, device, tau: float = 1.0, batch: int = 512) -> torch.Tensor:
    out = []
    for i in idx.split(batch):
        out.append(F.softmax(net(_clean_batch(split, i, device)).float() / tau, dim=1))
    return torch.cat(out)


def _clean_batch(split, idx: torch.Tensor, device) -> torch.Tensor:
    """Training images without augmentation (the probe looks at the samples themselves)."""
    return split.get_batch(idx, None, device, augment=False)


def select_probe_samples(manipulated: torch.Tensor, n: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Draw up to ``n`` training-sample indices at random from each subset, seeded.

    ``manipulated`` is a bool mask over the training set: 'manipulated' = its True samples, 'kept'
    = the others. Returns ({subset: sorted-in-draw-order indices}, {subset: how many existed}).
    The same (mask, n, seed) always draws the same samples.
    """
    manipulated = manipulated.bool().cpu()
    all_idx = torch.arange(len(manipulated))
    g = torch.Generator().manual_seed(int(seed))
    chosen, pools = {}, {}
    for name, m in (("manipulated", manipulated), ("kept", ~manipulated)):
        pool = all_idx[m]
        pools[name] = int(len(pool))
        chosen[name] = pool[torch.randperm(len(pool), generator=g)[:n]]
    return chosen, pools


def _manipulated(probe, teacher, student, split, all_idx, y_all, dev) -> tuple[torch.Tensor, str]:
    """Which training samples the run manipulated.

    From the run's own record (subset.pt: per sample, the epochs it was in the altered subset —
    the subset is recomputed every batch as the student trains): manipulated = altered in at
    least one epoch, kept = never altered. Runs without that record fall back to the subset rule
    evaluated with the teacher and the final student.
    """
    rec = Path(probe["run"]) / "subset.pt"
    if rec.exists():
        blob = torch.load(rec, map_location="cpu", weights_only=True)
        return blob["hits"] > 0, "altered in at least one epoch"
    p_t = _probs(teacher, split, all_idx, dev, probe["tau"])
    p_s = _probs(student, split, all_idx, dev, probe.get("tau_s", 1.0))
    return subset_mask(probe["subset"], p_t, p_s, y_all).cpu(), "subset rule on the final student"


def run_probe(probe: dict, device: str = "auto") -> Path:
    """Run one probe (a dict from ``studies.probe_targets`` plus n, eps, out, seed); write the table."""
    dev = resolve_device(device)
    cfg = probe["cfg"]
    data = data_for(cfg)
    split = data.train
    teacher = load_teacher(probe["teacher"], cfg["teachers"][probe["teacher"]], data).to(dev)
    nets = {"teacher": teacher, "student": _load_run_model(probe["run"], cfg, data).to(dev)}
    if probe.get("undistilled_hub"):  # e.g. the paper's MobileNet on ImageNet, with hub weights
        hub = probe["undistilled_hub"]
        nets["undistilled"] = model_for(hub["model"], data, pretrained=True).eval().requires_grad_(False).to(dev)
    elif probe.get("undistilled"):
        ucfg = yaml.safe_load((Path(probe["undistilled"]) / "config.yaml").read_text())
        nets["undistilled"] = _load_run_model(probe["undistilled"], ucfg, data).to(dev)

    all_idx = torch.arange(len(split))
    y_all = split.labels.to(dev)
    mask, how = _manipulated(probe, teacher, nets["student"], split, all_idx, y_all, dev)
    n = int(probe.get("n", 1000))
    chosen, pools = select_probe_samples(mask, n, int(probe.get("seed", 0)))
    if min(len(v) for v in chosen.values()) == 0:
        raise EffdstlError(f"run {Path(probe['run']).name}: {int(mask.sum())} of {len(mask)} training samples "
                           f"were manipulated ({how}), leaving no {'kept' if mask.all() else 'manipulated'} "
                           "samples to probe")

    rows = []
    for eps in probe.get("eps", DEFAULT_EPS):
        for subset, idx in chosen.items():
            for i in idx.split(256):
                x, y = _clean_batch(split, i, dev), y_all[i.to(dev)]
                x_adv = fgsm(teacher, x, y, float(eps))
                with torch.no_grad():
                    for net_name, net in nets.items():
                        c0 = true_prob(F.softmax(net(x).float(), 1), y)
                        c1 = true_prob(F.softmax(net(x_adv).float(), 1), y)
                        rows.append(pd.DataFrame({
                            "network": net_name, "subset": subset, "sample": i.numpy(), "eps": float(eps),
                            "conf_clean": c0.cpu().numpy(), "conf_adv": c1.cpu().numpy(),
                            "drop": (c0 - c1).cpu().numpy(), "run": Path(probe["run"]).name,
                            "pool": pools[subset]}))
    df = pd.concat(rows, ignore_index=True)
    out = Path(probe["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    fio.atomic_write_text(out.with_suffix(".csv"), df.to_csv(index=False))
    fio.write_json(out.with_suffix(".json"), {
        "run": Path(probe["run"]).name, "subset_rule": probe["subset"], "manipulated_means": how,
        "seed": int(probe.get("seed", 0)), "n": n, "eps": [float(e) for e in probe.get("eps", DEFAULT_EPS)],
        "existed": pools, "drawn": {k: int(len(v)) for k, v in chosen.items()},
        "networks": list(nets), "attack": f"FGSM from the {probe['teacher']} teacher"})
    fio.atomic_write_bytes(out, buf.getvalue())  # the parquet last: its presence means 'done'
    return out
