"""Study files: load (safe YAML), override (``--set a.b=v``), validate; and a run's identity.

A run's identity is the hash of its resolved config (Dora-style), so re-running a study finds
what is already done. Keys that say *where* rather than *what* (meta labels, data_root, the path
of a teacher trained by the study) are left out, so moving a results tree or a dataset between a
laptop and a cluster keeps every hash.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from .errors import EffdstlError, unknown

KINDS = ("replacement", "manipulation", "fgsm", "fig8", "recipe", "ablation")

STUDY_KEYS = {
    "name": str, "kind": str, "description": str, "dataset": str, "data_root": (str, type(None)),
    "image_size": (int, type(None)), "seeds": list, "batch_size": int, "teachers": dict,
    "teacher_schedule": dict, "triplets": list, "schedule": dict, "distill": dict, "grid": dict,
    "recipe": dict, "pairs": list, "settings": list, "baselines": list, "ablations": list, "fgsm": dict, "probe": dict,
    "slurm": dict, "paper": dict,
}
SCHEDULE_KEYS = ("epochs", "lr", "momentum", "weight_decay", "nesterov", "warmup_epochs", "min_lr", "batch_size", "seed",
                 "kind", "milestones", "gamma")
SCHEDULE_KINDS = ("cosine", "step")
TEACHER_KEYS = ("model", "pretrained", "ckpt") + SCHEDULE_KEYS
PAIR_KEYS = ("name", "student", "teacher1", "teacher2")
SETTING_KEYS = ("name", "stage1", "stage2", "single")
ABLATION_KEYS = ("label", "part", "student", "teacher1", "teacher2", "stage1", "stage2")
PROBE_KEYS = ("distiller", "undistilled", "n", "eps")


def config_hash(cfg: dict) -> str:
    """12 hex chars of sha256 over the config's identity (see module doc)."""
    ident = copy.deepcopy({k: v for k, v in cfg.items() if k not in ("meta", "data_root")})
    for t in (ident.get("teachers") or {}).values():
        if "run" in t:
            t.pop("ckpt", None)
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _parse_set(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise EffdstlError(f"--set expects key=value (e.g. schedule.epochs=5), got '{item}'")
    key, val = item.split("=", 1)
    try:
        value = yaml.safe_load(val)
    except yaml.YAMLError:
        value = val
    return key.strip().split("."), value


def apply_sets(study: dict, sets: list[str] | None) -> dict:
    """``--set schedule.epochs=5 --set seeds=[0,1]``: values parsed as YAML."""
    study = copy.deepcopy(study)
    for item in sets or []:
        path, value = _parse_set(item)
        if path[0] not in STUDY_KEYS:
            raise unknown("study key", path[0], STUDY_KEYS)
        node = study
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise EffdstlError(f"--set {item}: '{p}' is not a mapping in the study")
        node[path[-1]] = value
    return study


def load_study(path: str | Path, sets: list[str] | None = None) -> dict:
    """Read, override and validate a study file; every problem is one clear line."""
    path = Path(path)
    if not path.exists():
        near = sorted(p.name for p in Path("studies").glob("*.yaml")) if Path("studies").is_dir() else []
        hint = f" (studies here: {', '.join(near)})" if near else ""
        raise EffdstlError(f"study file {path} does not exist{hint}")
    try:
        study = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise EffdstlError(f"study file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(study, dict):
        raise EffdstlError(f"study file {path} must be a mapping of keys (name, kind, dataset, ...)")
    study = apply_sets(study, sets)
    study.setdefault("name", path.stem)
    validate_study(study, str(path))
    return study


def _positive(where: str, key: str, value: Any, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise EffdstlError(f"{where}: {key} must be {kind}, got {value!r}")


def validate_schedule(where: str, sched: dict) -> None:
    for k in sched:
        if k not in SCHEDULE_KEYS:
            raise unknown(f"schedule key in {where}", k, SCHEDULE_KEYS)
    if "epochs" in sched:
        _positive(where, "epochs", sched["epochs"], integer=True)
    if "batch_size" in sched:
        _positive(where, "batch_size", sched["batch_size"], integer=True)
    if "lr" in sched:
        _positive(where, "lr", sched["lr"])
    for k in ("weight_decay", "min_lr", "warmup_epochs", "momentum"):
        v = sched.get(k)
        if v is not None and (not isinstance(v, (int, float)) or v < 0):
            raise EffdstlError(f"{where}: {k} must be a number >= 0, got {v!r}")
    kind = sched.get("kind", "cosine")
    if kind not in SCHEDULE_KINDS:
        raise unknown(f"schedule kind in {where}", kind, SCHEDULE_KINDS)
    if kind != "step" and ("milestones" in sched or "gamma" in sched):
        raise EffdstlError(f"{where}: milestones and gamma need kind: step (the default kind is cosine)")
    ms = sched.get("milestones", [])
    if not (isinstance(ms, list) and all(isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0 for m in ms)
            and ms == sorted(ms)):
        raise EffdstlError(f"{where}: milestones must be an ascending list of epochs > 0, got {ms!r}")
    g = sched.get("gamma", 0.1)
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g <= 1:
        raise EffdstlError(f"{where}: gamma must be a number in (0, 1], got {g!r}")


def validate_study(study: dict, where: str) -> None:
    import re

    for k, v in study.items():
        if k not in STUDY_KEYS:
            raise unknown(f"key in study {where}", k, STUDY_KEYS)
        if not isinstance(v, STUDY_KEYS[k]):
            raise EffdstlError(f"{where}: '{k}' has the wrong type ({type(v).__name__})")
    name = str(study["name"])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) or ".." in name:
        raise EffdstlError(f"{where}: study name '{name}' must be letters, digits, '.', '_' or '-' "
                           "(it names a folder under the results root)")
    for req in ("kind", "dataset"):
        if req not in study:
            raise EffdstlError(f"{where}: missing required key '{req}'")
    if study["kind"] not in KINDS:
        raise unknown("study kind", study["kind"], KINDS)
    seeds = study.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise EffdstlError(f"{where}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if "batch_size" in study:
        _positive(where, "batch_size", study["batch_size"], integer=True)
    validate_schedule(f"{where} schedule", study.get("schedule", {}))
    validate_schedule(f"{where} teacher_schedule", study.get("teacher_schedule", {}))
    for tname, t in (study.get("teachers") or {}).items():
        if not isinstance(t, dict) or "model" not in t:
            raise EffdstlError(f"{where}: teacher '{tname}' needs at least 'model'")
        for k in t:
            if k not in TEACHER_KEYS:
                raise unknown(f"key of teacher '{tname}'", k, TEACHER_KEYS)
        validate_schedule(f"{where} teacher '{tname}'", {k: v for k, v in t.items() if k in SCHEDULE_KEYS})
        if t.get("ckpt") and not Path(str(t["ckpt"])).expanduser().exists():
            raise EffdstlError(f"{where}: teacher '{tname}' checkpoint {t['ckpt']} does not exist")
    _check_shapes(study, where)
    for i, tr in enumerate(study.get("triplets") or []):
        for k in ("weak", "strong", "student"):
            if k not in tr:
                raise EffdstlError(f"{where}: triplet {i} needs '{k}'")
        for k in ("weak", "strong"):
            if tr[k] not in (study.get("teachers") or {}):
                raise unknown(f"teacher in triplet {i}", tr[k], study.get("teachers") or {})
    for k, v in (study.get("slurm") or {}).items():
        if k not in ("gpus_per_job", "partition"):
            raise unknown(f"key of slurm in study {where}", k, ("gpus_per_job", "partition"))
        if k == "gpus_per_job" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise EffdstlError(f"{where}: slurm.gpus_per_job must be an integer >= 0, got {v!r}")
    dist = study.get("distill") or {}
    for k in dist:
        if k not in ("tau", "lam"):
            raise unknown("key of distill", k, ("tau", "lam"))
    for k in ("tau",):
        if k in dist and not (isinstance(dist[k], (int, float)) and dist[k] > 0):
            raise EffdstlError(f"{where}: distill.{k} must be > 0, got {dist[k]!r}")
    lam = dist.get("lam", 1.0)
    if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and 0 <= lam <= 1):
        raise EffdstlError(f"{where}: distill.lam must be a number in [0, 1], got {lam!r}")


def _check_shapes(study: dict, where: str) -> None:
    """Nested sections have the layout the expanders read (else a TypeError deep in planning)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise EffdstlError(f"{where}: {what}")

    for i, tr in enumerate(study.get("triplets") or []):
        need(isinstance(tr, dict), f"triplet {i} must be a mapping {{weak, strong, student}}, got {tr!r}")
    grid = study.get("grid") or {}
    for k in ("scheme", "subset", "kind"):
        if k in grid:
            need(isinstance(grid[k], list) and all(isinstance(v, str) for v in grid[k]),
                 f"grid.{k} must be a list of names (e.g. [full, partial]), got {grid[k]!r}")
    params = grid.get("params") or {}
    need(isinstance(params, dict) and all(isinstance(v, dict) for v in params.values()),
         f"grid.params must map a manipulation to its parameter (e.g. label_smoothing: {{t: 0.9}}), got {params!r}")
    need(all(isinstance(b, str) for b in study.get("baselines") or []),
         f"baselines must be a list of names, got {study.get('baselines')!r}")
    recipe = study.get("recipe") or {}
    for k in ("stage1", "stage2"):
        need(isinstance(recipe.get(k) or {}, dict), f"recipe.{k} must be a mapping, got {recipe.get(k)!r}")
    for i, a in enumerate(study.get("ablations") or []):
        need(isinstance(a, dict) and isinstance(a.get("stage2") or {}, dict),
             f"ablation {i} must be a mapping {{label, stage2: {{...}}}}, got {a!r}")
    teachers = study.get("teachers") or {}
    for what, items, keys in (("pair", study.get("pairs"), PAIR_KEYS), ("setting", study.get("settings"), SETTING_KEYS),
                              ("ablation", study.get("ablations"), ABLATION_KEYS)):
        for i, it in enumerate(items or []):
            need(isinstance(it, dict), f"{what} {i} must be a mapping of {', '.join(keys)}, got {it!r}")
            for k, v in it.items():
                if k not in keys:
                    raise unknown(f"key of {what} {i}", k, keys)
                if k in ("stage1", "stage2", "single"):
                    need(isinstance(v, dict), f"{what} {i}: {k} must be a mapping, got {v!r}")
                if k in ("teacher1", "teacher2") and v not in teachers:
                    raise unknown(f"teacher in {what} {i}", v, teachers)
    for k, v in (study.get("probe") or {}).items():
        if k not in PROBE_KEYS:
            raise unknown("key of probe", k, PROBE_KEYS)
        need(k != "distiller" or isinstance(v, dict), f"probe.distiller must be a mapping, got {v!r}")
        need(k != "n" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), f"probe.n must be an integer >= 1, got {v!r}")
        need(k != "eps" or (isinstance(v, list) and v and all(isinstance(e, (int, float)) and not isinstance(e, bool)
                                                               and 0 < e <= 1 for e in v)),
             f"probe.eps must be a list of FGSM steps in (0, 1] (pixel units), got {v!r}")
        need(k != "undistilled" or isinstance(v, str) or (isinstance(v, dict) and "model" in v),
             f"probe.undistilled must be a model spec (e.g. mlp:64) or {{model, pretrained: true}}, got {v!r}")
