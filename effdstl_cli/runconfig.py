"""A run's config: the one builder of it, used by the study planner, the single-run commands and
the bench.

A run config is what a run directory is named after (``config.config_hash``): every key here is
part of a run's identity except ``meta`` (what tables and figures group by) and ``data_root``.
Changing what these functions write renames every run of every study, so they only grow keys that
are absent by default (e.g. a step schedule's ``kind``).
"""

from __future__ import annotations

from .config import data_keys

DEFAULT_SCHEDULE = {"epochs": 10, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False,
                    "warmup_epochs": 0, "min_lr": 0.0}


def stage(sched: dict, distiller: dict) -> dict:
    """One training stage: ``sched`` (over DEFAULT_SCHEDULE: epochs, SGD, cosine or step) and the
    distiller spec it trains with."""
    s = {**DEFAULT_SCHEDULE, **sched}
    out = {"epochs": int(s["epochs"]), "distiller": distiller,
           "optim": {"lr": float(s["lr"]), "momentum": float(s["momentum"]),
                     "weight_decay": float(s["weight_decay"]), "nesterov": bool(s["nesterov"])},
           "sched": {"warmup_epochs": float(s["warmup_epochs"]), "min_lr": float(s["min_lr"])}}
    if s.get("kind", "cosine") == "step":  # cosine (the default) adds no key: its run hashes stay
        out["sched"].update(kind="step", milestones=[float(m) for m in s.get("milestones") or []],
                            gamma=float(s.get("gamma", 0.1)))
    return out


def run_config(role: str, data: dict, model: str, seed: int, batch_size: int, stages: list[dict],
               teachers: dict, meta: dict) -> dict:
    """A run: ``role`` (teacher | student), the data keys of ``data`` (a study or a mapping with
    ``dataset`` ...; ``augment`` resolved for ``role``), the model spec, seed, global batch, its stages (epochs add up), the teachers
    it reads by role (``{'weak': {model, run, ckpt} | {model, pretrained} ...}``) and its meta."""
    return {"role": role, **data_keys(data, role), "model": model, "seed": int(seed), "batch_size": int(batch_size),
            "epochs": sum(int(s["epochs"]) for s in stages), "stages": stages, "teachers": teachers, "meta": meta}
