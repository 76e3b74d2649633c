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
import math
import os
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import EffdstlError, unknown

KINDS = ("replacement", "manipulation", "fgsm", "fig8", "recipe", "ablation")

STUDY_KEYS = {
    "name": str, "kind": str, "description": str, "dataset": str, "data_root": (str, type(None)),
    "image_size": (int, type(None)), "train_per_class": (int, type(None)),
    "test_per_class": (int, type(None)), "augment": object, "seeds": list, "batch_size": int, "teachers": dict,
    "teacher_schedule": dict, "triplets": list, "schedule": dict, "distill": dict, "grid": dict,
    "recipe": dict, "pairs": list, "settings": list, "baselines": list, "ablations": list, "fgsm": dict, "probe": dict,
    "slurm": dict, "paper": dict,
}
SCHEDULE_KEYS = ("epochs", "lr", "momentum", "weight_decay", "nesterov", "warmup_epochs", "min_lr", "batch_size", "seed",
                 "kind", "milestones", "gamma")
TEACHER_KEYS = ("model", "pretrained", "ckpt") + SCHEDULE_KEYS
SCHEDULE_KINDS = ("cosine", "step")
PAIR_KEYS = ("name", "student", "teacher1", "teacher2")
SETTING_KEYS = ("name", "stage1", "stage2", "single")
ABLATION_KEYS = ("label", "part", "student", "teacher1", "teacher2", "stage1", "stage2")
PROBE_KEYS = ("distiller", "undistilled", "n", "eps")
ROLES = ("teacher", "student")
_STAGE_SCHED = ("epochs", "lr", "momentum", "weight_decay", "nesterov", "warmup_epochs", "min_lr",
                "kind", "milestones", "gamma")
_STAGE1 = _STAGE_SCHED + ("T", "ls", "w_ce", "w_wsl")
_STAGE2 = _STAGE_SCHED + ("tau_t", "tau_s", "smooth", "subset", "teacher")

# The schema: every key allowed at every depth of a study, in ONE table. A section maps to the
# tuple of its keys; ``NAMES`` = its keys are names the user picks (teachers); ``None`` = free-form
# (checked where it is used). A list section (triplets, ablations) holds mappings of those keys.
# A child section is "<parent>.<key>" ("<parent>.*" under NAMES). New keys are one-line additions.
NAMES = "names"
SCHEMA: dict[str, tuple | str | Callable[[], tuple] | None] = {
    "": tuple(STUDY_KEYS),
    "schedule": SCHEDULE_KEYS,
    "teacher_schedule": SCHEDULE_KEYS,
    "teachers": NAMES,
    "teachers.*": TEACHER_KEYS,
    "triplets": ("weak", "strong", "student"),
    "distill": ("tau", "lam"),
    "grid": ("scheme", "subset", "kind", "params"),
    "grid.params": NAMES,         # manipulation names: checked against the registry (targets.py)
    "grid.params.*": lambda: _param_names(),  # each manipulation's parameter name (the registry may grow)
    "recipe": ("student", "teacher1", "teacher2", "stage1", "stage2"),
    "recipe.stage1": _STAGE1,
    "recipe.stage2": _STAGE2,
    "pairs": PAIR_KEYS,
    "settings": SETTING_KEYS,
    "settings.stage1": _STAGE1,
    "settings.stage2": _STAGE2,
    "settings.single": _STAGE_SCHED,
    "ablations": ABLATION_KEYS,
    "ablations.stage1": _STAGE1,
    "ablations.stage2": _STAGE2,
    "probe": PROBE_KEYS,
    "augment": ROLES,             # per role: {teacher: true, student: false}
    "probe.distiller": None,      # a distiller spec: checked by distillers.build_distiller (validate_runs)
    "probe.undistilled": None,    # a model spec, or a mapping: checked where the probe is planned
    "probe.eps": None,
    "fgsm": (),                   # no keys yet
    "slurm": ("gpus_per_job", "partition"),
    "paper": None,                # the paper's numbers, for reference
}


# The top-level sections only some study kinds read (studies.py's expanders); the others read every
# kind (distill: the sweeps' and the recipe baselines' KD; probe: `effdstl attack fgsm` on any study).
SECTION_KINDS = {
    "triplets": ("replacement", "manipulation", "fgsm"), "grid": ("replacement", "manipulation"),
    "recipe": ("recipe", "ablation", "fig8"), "pairs": ("recipe",), "settings": ("recipe",),
    "baselines": ("recipe",), "ablations": ("ablation",),
}
# ...and the keys of a section that only some of its kinds read
SUBKEY_KINDS = {"grid.scheme": ("replacement",), "grid.kind": ("manipulation",), "grid.params": ("manipulation",)}


# The keys of a study or run config that say which data a run sees (one list: studies copy them into
# run configs, groups must share them, teacher-output caches are keyed by them).
DATA_KEYS = ("dataset", "data_root", "image_size", "train_per_class", "test_per_class", "augment")


def augment_for(src: dict, role: str | None = None) -> bool:
    """Whether ``role``'s runs train with the dataset's augmentation. A study's ``augment`` is a
    bool or ``{teacher: bool, student: bool}`` (missing = true); a run config holds the resolved bool."""
    aug = src.get("augment", True)
    return bool(aug.get(role, True)) if isinstance(aug, dict) else bool(aug)


def data_keys(src: dict, role: str | None = None) -> dict:
    """The data keys of a study or run config (``role``: whose augmentation, for a study's
    per-role ``augment``). The subset keys appear only when set, and ``augment`` only when off, so
    configs written before they existed keep their hashes."""
    out = {k: src.get(k) for k in DATA_KEYS[:3]}
    out.update({k: int(src[k]) for k in ("train_per_class", "test_per_class") if src.get(k) is not None})
    if not augment_for(src, role):
        out["augment"] = False
    return out


def _param_names() -> tuple[str, ...]:
    from .targets import param_names  # at call time: data imports this module, and sits below targets

    return param_names()


def check_keys(study: dict, where: str) -> None:
    """Every key at every depth against ``SCHEMA``: an unknown one is one line with did-you-mean."""
    def walk(node: Any, section: str, shown: str) -> None:
        allowed = SCHEMA.get(section)
        if callable(allowed):
            allowed = allowed()
        if allowed is None:
            return
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, section, f"{shown}[{i}]")
            return
        if not isinstance(node, dict):
            return
        for k, v in node.items():
            if allowed != NAMES and k not in allowed:
                if not section:
                    raise unknown(f"key in study {where}", k, allowed)
                raise unknown(f"key of {shown} in study {where}", k, allowed)
            child = f"{section}.*" if allowed == NAMES else (f"{section}.{k}" if section else str(k))
            walk(v, child, f"{shown}.{k}" if shown else str(k))

    walk(study, "", "")


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
    except yaml.YAMLError as exc:
        if val.lstrip()[:1] in ("[", "{", "'", '"'):  # meant as a list, mapping or quoted text
            raise EffdstlError(f"--set {item}: the value is not valid YAML ({getattr(exc, 'problem', None) or exc}; "
                               "an unclosed bracket or quote?)") from None
        value = val  # plain text YAML cannot parse (e.g. 'a: b'): the text itself
    check_size(value, f"--set {key.strip()}")
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


STUDY_MAX_BYTES = 1 << 20   # the largest study file read (the paper's studies are a few KB)
MAX_VALUES = 100_000        # the most values a study may expand to (YAML aliases share, then multiply)


def regular_file_stat(path: str | Path, what: str, cure: str) -> os.stat_result:
    """``os.stat`` of a regular file, else one line naming what it is and the ``cure``: reading a
    FIFO blocks forever and a device never ends, so nothing is opened before this says yes."""
    import stat

    try:
        st = os.stat(path)
    except OSError as exc:
        raise EffdstlError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        m = st.st_mode
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(m) else "a character device" if stat.S_ISCHR(m)
                else "a block device" if stat.S_ISBLK(m) else "a socket" if stat.S_ISSOCK(m)
                else "a folder" if stat.S_ISDIR(m) else "not a regular file")
        raise EffdstlError(f"{what} {path} is {kind}; {cure}")
    return st


def read_small_file(path: Path, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, else one line: a FIFO would block
    forever, /dev/zero never ends, and a huge file is no study (checked before anything is read)."""
    st = regular_file_stat(path, what, "pass a regular YAML file (e.g. studies/figure5-digits.yaml)")
    if st.st_size > limit:
        raise EffdstlError(f"{what} {path} has {st.st_size} bytes, more than the {limit} a study may have; "
                           "is it the right file?")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise EffdstlError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:  # it grew after the stat
        raise EffdstlError(f"{what} {path} has more than {limit} bytes; is it the right file?")
    return data


def check_size(obj: Any, what: str, limit: int = MAX_VALUES) -> None:
    """Refuse a YAML value that expands to more than ``limit`` values: aliases make a few lines of
    YAML ("billion laughs") stand for more lists than memory holds, and copying or hashing them
    later would run out of memory. The walk stops at ``limit``, so the refusal is quick; a
    self-referencing alias is refused the same way."""
    seen, stack = 0, [obj]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > limit:
            raise EffdstlError(f"{what} expands to more than {limit} values (YAML aliases nested or "
                               "repeated too often?); a study is a small mapping")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def load_study(path: str | Path, sets: list[str] | None = None) -> dict:
    """Read, override and validate a study file; every problem is one clear line."""
    path = Path(path)
    if not path.exists():
        near = sorted(p.name for p in Path("studies").glob("*.yaml")) if Path("studies").is_dir() else []
        hint = f" (studies here: {', '.join(near)})" if near else ""
        raise EffdstlError(f"study file {path} does not exist{hint}")
    if path.is_dir():
        raise EffdstlError(f"study file {path} is a directory; pass a YAML file (e.g. studies/figure5-digits.yaml)")
    try:
        text = read_small_file(path, "study file", STUDY_MAX_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EffdstlError(f"study file {path} is not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at "
                           f"offset {exc.start}); a study is YAML text, e.g. studies/figure5-digits.yaml") from None
    if "\x00" in text:
        raise EffdstlError(f"study file {path} is a binary file (it holds NUL bytes); a study is YAML text, "
                           "e.g. studies/figure5-digits.yaml")
    try:
        study = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise EffdstlError(f"study file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    check_size(study, f"study file {path}")
    if not isinstance(study, dict):
        raise EffdstlError(f"study file {path} must be a mapping of keys (name, kind, dataset, ...)")
    if sets:  # a problem with the file as it is is the file's; one the overrides made is theirs
        try:
            validate_study({**study, "name": study.get("name", path.stem)}, str(path))
        except EffdstlError:
            pass
        else:
            study = apply_sets(study, sets)
            study.setdefault("name", path.stem)
            validate_study(study, f"{path} with --set {' '.join(sets)}")
            return study
    study = apply_sets(study, sets)
    study.setdefault("name", path.stem)
    validate_study(study, str(path))
    return study


SEED_LIMIT = 2 ** 32  # seeds feed torch and numpy generators: integers in [0, 2**32)


def is_seed(value: Any) -> bool:
    """An integer seed in [0, 2**32) (``true`` is no seed, though YAML's true == 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool: YAML's true would count as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(where: str, key: str, value: Any, integer: bool = False) -> None:
    ok = is_number(value) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        if isinstance(value, float) and value > 0 and not math.isfinite(value):
            kind = "a finite, positive number"
        raise EffdstlError(f"{where}: {key} must be {kind}, got {value!r}{_number_hint(value)}")


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
        if v is not None and not (is_number(v) and v >= 0):
            finite = "finite " if isinstance(v, float) and v > 0 and not math.isfinite(v) else ""
            raise EffdstlError(f"{where}: {k} must be a {finite}number >= 0, got {v!r}{_number_hint(v)}")
    if "epochs" in sched and "warmup_epochs" in sched and sched["warmup_epochs"] >= sched["epochs"]:
        raise EffdstlError(f"{where}: warmup_epochs ({sched['warmup_epochs']}) must be shorter than epochs "
                           f"({sched['epochs']}): the learning rate would never leave the warm-up")
    if "momentum" in sched and sched["momentum"] >= 1:
        raise EffdstlError(f"{where}: momentum must be in [0, 1), got {sched['momentum']!r}")
    if "nesterov" in sched and not isinstance(sched["nesterov"], bool):
        raise EffdstlError(f"{where}: nesterov must be true or false, got {sched['nesterov']!r}")
    if "seed" in sched and not is_seed(sched["seed"]):
        raise EffdstlError(f"{where}: seed must be an integer in [0, 2**32), got {sched['seed']!r}")
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


_TYPE_TEXT = {str: "text", int: "an integer", list: "a list", dict: "a mapping", type(None): "null", object: "a value"}


def _type_text(want) -> str:
    return " or ".join(_TYPE_TEXT.get(t, t.__name__) for t in (want if isinstance(want, tuple) else (want,)))


def _number_hint(v: Any) -> str:
    """For a number YAML read as text (``1e9``, ``1e-3``: YAML 1.1 wants a dot before the 'e')."""
    if isinstance(v, str):
        try:
            x = float(v)
        except ValueError:
            return ""
        if x == x and abs(x) != float("inf"):
            return f" (YAML reads {v} as text; write {int(x) if x.is_integer() else repr(x)})"
    return ""


def check_study_name(name: str, where: str) -> None:
    """A study name names a folder under the results root: one path component of plain characters
    (no '/', spaces or newlines, no leading '-' or '.'). The study file's ``name:`` and the CLI's
    ``--name`` obey the same rule."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) or ".." in name:
        raise EffdstlError(f"{where} {name!r} must be letters, digits, '.', '_' or '-', starting with a letter "
                           "or digit, without '..', at most 100 characters (it names a folder under the results root)")


def validate_study(study: dict, where: str) -> None:
    for k, v in study.items():
        if k not in STUDY_KEYS:
            raise unknown(f"key in study {where}", k, STUDY_KEYS)
        want = STUDY_KEYS[k]
        if not isinstance(v, want) or (isinstance(v, bool) and want is not object and bool not in (want if isinstance(want, tuple) else (want,))):
            raise EffdstlError(f"{where}: '{k}' has the wrong type ({type(v).__name__}): it must be "
                               f"{_type_text(want)}, got {v!r}{_number_hint(v)}")
    check_study_name(str(study["name"]), f"{where}: study name")
    for req in ("kind", "dataset"):
        if req not in study:
            raise EffdstlError(f"{where}: missing required key '{req}'")
    if study["kind"] not in KINDS:
        raise unknown("study kind", study["kind"], KINDS)
    for k, kinds in SECTION_KINDS.items():  # a key the kind never reads would be ignored in silence
        if study.get(k) and study["kind"] not in kinds:
            raise EffdstlError(f"{where}: '{k}' is not read by {study['kind']} studies (only by {', '.join(kinds)}); "
                               f"remove it (or use a study of that kind)")
    for k, kinds in SUBKEY_KINDS.items():
        sec, sub = k.split(".")
        if isinstance(study.get(sec), dict) and study[sec].get(sub) is not None and study["kind"] not in kinds:
            raise EffdstlError(f"{where}: '{k}' is not read by {study['kind']} studies (only by {', '.join(kinds)}); "
                               f"remove it (or use a study of that kind)")
    for tname, t in (study.get("teachers") or {}).items():  # a teacher that is given is not trained
        if isinstance(t, dict) and (t.get("ckpt") or t.get("pretrained")):
            unread = [k for k in t if k in SCHEDULE_KEYS]
            if unread:
                raise EffdstlError(f"{where}: teacher '{tname}' is given by {'ckpt' if t.get('ckpt') else 'pretrained'}, "
                                   f"so it is not trained and '{unread[0]}' is never read; remove it")
    seeds = study.get("seeds", [0])
    if not seeds or not all(is_seed(s) for s in seeds):
        raise EffdstlError(f"{where}: seeds must be a non-empty list of integers in [0, 2**32), got {seeds!r}")
    if len(set(map(repr, seeds))) != len(seeds):
        raise EffdstlError(f"{where}: seeds lists a seed twice ({_dups(seeds)}); each seed is one set of runs")
    if "batch_size" in study:
        _positive(where, "batch_size", study["batch_size"], integer=True)
    for key in ("image_size", "train_per_class", "test_per_class"):
        if study.get(key) is not None:
            _positive(where, key, study[key], integer=True)
    aug = study.get("augment", True)
    for k, v in (aug.items() if isinstance(aug, dict) else [("", aug)]):
        if k and k not in ROLES:
            raise unknown(f"key of augment in study {where}", k, ROLES)
        if not isinstance(v, bool):
            raise EffdstlError(f"{where}: augment{'.' + k if k else ''} must be true or false, got {v!r}")
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
        if k in dist and not (is_number(dist[k]) and dist[k] > 0):
            raise EffdstlError(f"{where}: distill.{k} must be > 0, got {dist[k]!r}")
    lam = dist.get("lam", 1.0)
    if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and 0 <= lam <= 1):
        raise EffdstlError(f"{where}: distill.lam must be a number in [0, 1], got {lam!r}")
    check_keys(study, where)   # every key at every depth (SCHEMA)
    _check_values(study, where)


def _dups(values: list) -> str:
    """The values listed more than once, by the equality the duplicate checks use (repr)."""
    seen, dup = set(), []
    for v in values:
        key = repr(v)
        if key in seen and key not in map(repr, dup):
            dup.append(v)
        seen.add(key)
    return ", ".join(map(str, dup))


def _check_values(study: dict, where: str) -> None:
    """Numbers and lists of the nested sections against their domains (the rest of validate_study)."""
    grid = study.get("grid") or {}
    for k in ("scheme", "subset", "kind"):
        vals = grid.get(k) or []
        if len(set(map(repr, vals))) != len(vals):
            raise EffdstlError(f"{where}: grid.{k} lists {_dups(vals)} twice; each value is one run")
    for kind, prm in (grid.get("params") or {}).items():
        for pk, pv in (prm or {}).items():
            vals = pv if isinstance(pv, list) else [pv]
            if len(set(map(repr, vals))) != len(vals):
                raise EffdstlError(f"{where}: grid.params.{kind}.{pk} lists {_dups(vals)} twice; each value is one run")
    base = study.get("baselines") or []
    if len(set(base)) != len(base):
        raise EffdstlError(f"{where}: baselines lists {_dups(base)} twice")
    trs = [repr(sorted(t.items())) for t in study.get("triplets") or [] if isinstance(t, dict)]
    if len(set(trs)) != len(trs):
        raise EffdstlError(f"{where}: triplets lists the same triplet twice")
    recipe = study.get("recipe") or {}
    stages = [("recipe.stage1", recipe.get("stage1") or {}), ("recipe.stage2", recipe.get("stage2") or {})]
    stages += [(f"ablation {i} stage2", a.get("stage2") or {}) for i, a in enumerate(study.get("ablations") or [])
               if isinstance(a, dict)]
    for name, st in stages:
        if isinstance(st, dict):
            validate_schedule(f"{where} {name}", {k: v for k, v in st.items() if k in _STAGE_SCHED})
            for k in ("T", "tau_t", "tau_s"):
                if k in st:
                    _positive(f"{where} {name}", k, st[k])
            for k in ("ls", "smooth"):
                v = st.get(k)
                if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1):
                    raise EffdstlError(f"{where} {name}: {k} must be a number in [0, 1], got {v!r}")
            for k in ("w_ce", "w_wsl"):
                v = st.get(k)
                if v is not None and not (is_number(v) and v >= 0):
                    raise EffdstlError(f"{where} {name}: {k} must be a finite number >= 0, got {v!r}")
    labels = [a.get("label") for a in study.get("ablations") or [] if isinstance(a, dict)]
    if len(set(map(repr, labels))) != len(labels):
        raise EffdstlError(f"{where}: ablations lists the label {_dups(labels)} twice")


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
            for k, v in it.items():  # unknown keys: check_keys (SCHEMA)
                if k in ("stage1", "stage2", "single"):
                    need(isinstance(v, dict), f"{what} {i}: {k} must be a mapping, got {v!r}")
                if k in ("teacher1", "teacher2") and v not in teachers:
                    raise unknown(f"teacher in {what} {i}", v, teachers)
    for k, v in (study.get("probe") or {}).items():
        need(k != "distiller" or isinstance(v, dict), f"probe.distiller must be a mapping, got {v!r}")
        need(k != "n" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), f"probe.n must be an integer >= 1, got {v!r}")
        need(k != "eps" or (isinstance(v, list) and v and all(isinstance(e, (int, float)) and not isinstance(e, bool)
                                                               and 0 < e <= 1 for e in v)),
             f"probe.eps must be a list of FGSM steps in (0, 1] (pixel units), got {v!r}")
        need(k != "undistilled" or isinstance(v, str) or (isinstance(v, dict) and "model" in v),
             f"probe.undistilled must be a model spec (e.g. mlp:64) or {{model, pretrained: true}}, got {v!r}")
