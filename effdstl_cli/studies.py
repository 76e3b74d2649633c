"""A study becomes a DAG of jobs: teachers -> student groups -> probes.

Each job is a list of runs (config, run directory); a group job trains its runs together (one
data stream, shared teachers and seed). Run directories are named by config hash, so planning a
study again finds finished runs (skipped), unfinished ones (resumed) and missing ones (started).
The paper's study kinds each have one small expander below: a new kind touches one place.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import config_hash, data_keys
from .errors import EffdstlError, unknown
from .rundir import run_of, run_state  # noqa: F401 - the one definition of a run's state; re-exported
from .runconfig import DEFAULT_SCHEDULE, run_config, stage

@dataclass
class Job:
    name: str
    work: str                                   # train | probe
    runs: list[tuple[dict, Path]]
    deps: list[str] = field(default_factory=list)
    probe: dict | None = None                   # for probe jobs: what to attack

    def state(self) -> str:
        """damaged | running | partial | pending | failed | done, from the run directories alone
        (each run's verdict is ``rundir.RunDir.state``)."""
        if self.work == "probe":
            return "done" if Path(self.probe["out"]).exists() else "pending"
        states = [run_state(d) for _, d in self.runs]
        for s in ("damaged", "running", "partial", "pending"):
            if s in states:
                return s
        return "failed" if "failed" in states else "done"


@dataclass
class Plan:
    study: dict
    study_dir: Path
    jobs: list[Job]

    def job(self, name: str) -> Job:
        return next(j for j in self.jobs if j.name == name)


def study_dir(results_root: str | Path, name: str) -> Path:
    root = Path(results_root).resolve()
    d = (root / name).resolve()
    if root not in d.parents:
        raise EffdstlError(f"study name '{name}' would leave the results root {root}")
    return d


# -- building blocks -------------------------------------------------------------------------

def _file_sha(path: str | Path, what: str) -> str:
    """The checkpoint's sha256 (16 hex digits), or one line: a FIFO would block forever, and a
    folder or device is no checkpoint."""
    from .config import regular_file_stat

    regular_file_stat(path, f"{what}:", "pass a run's model.pt or its run folder")
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    except OSError as exc:
        raise EffdstlError(f"{what}: {path} cannot be read ({exc.strerror or exc})") from None
    return h.hexdigest()[:16]


class _Ctx:
    """What expanders share: the study, its folder, the teacher jobs and references."""

    def __init__(self, study: dict, sdir: Path):
        self.study, self.sdir = study, sdir
        self.teacher_jobs: dict[str, Job] = {}
        self.teacher_refs: dict[str, dict] = {}
        ts = {**DEFAULT_SCHEDULE, "batch_size": study.get("batch_size", 64), "seed": 0,
              **(study.get("teacher_schedule") or {})}
        for name, t in (study.get("teachers") or {}).items():
            if t.get("pretrained") or t.get("ckpt"):
                ref = {"model": t["model"], "pretrained": bool(t.get("pretrained", False))}
                if t.get("ckpt"):
                    what = f"study {study['name']}: teacher '{name}' ckpt {t['ckpt']}"
                    p = Path(t["ckpt"]).expanduser().resolve()
                    if p.is_dir() and (p / "config.yaml").is_file():  # a run folder, as --teacher takes it
                        p = p / "model.pt"
                    run = run_of(p)  # the model.pt of a run: finished and intact, or one line
                    if run is not None:
                        run.require_finished(what)
                    ref.update(ckpt=str(p), sha256=_file_sha(p, what))
                self.teacher_refs[name] = ref
                continue
            sched = {**ts, **{k: v for k, v in t.items() if k not in ("model", "pretrained", "ckpt")}}
            cfg = run_config("teacher", study, t["model"], sched["seed"], sched["batch_size"],
                             [stage(sched, {"name": "none"})], {},
                             self.meta(study_kind="teacher", student=t["model"], distiller="none",
                                       label=f"teacher {name}", seed=int(sched["seed"])))
            h = config_hash(cfg)
            rd = sdir / "runs" / h
            self.teacher_jobs[name] = Job(f"teacher-{name}", "train", [(cfg, rd)])
            self.teacher_refs[name] = {"model": t["model"], "run": h, "ckpt": str(rd / "model.pt")}

    def meta(self, **kw) -> dict:
        m = {"study": self.study["name"], "study_kind": self.study["kind"], "dataset": self.study["dataset"],
             "student": "", "weak": "", "strong": "", "triplet": "", "distiller": "", "scheme": "",
             "manipulation": "", "subset": "", "param": None, "baseline": "", "label": "", "seed": None,
             "pair": "", "setting": "", "part": "", "group": ""}
        m.update(kw)
        return m

    def student(self, model: str, seed: int, stages: list[dict], roles: dict[str, str], **meta) -> dict:
        """A student run: ``roles`` maps the distillers' teacher names (weak/strong) to study teachers."""
        teachers = {}
        for role, tname in roles.items():
            if tname not in self.teacher_refs:
                raise unknown("teacher", tname, self.teacher_refs)
            teachers[role] = copy.deepcopy(self.teacher_refs[tname])
        tmodels = {r: self.teacher_refs[t]["model"] for r, t in roles.items()}
        weak, strong = tmodels.get("weak", ""), tmodels.get("strong", "")
        return run_config("student", self.study, model, seed, self.study.get("batch_size", 64), stages, teachers,
                          self.meta(student=model, weak=weak, strong=strong, triplet=f"{weak}|{strong}|{model}",
                                    seed=int(seed), **meta))

    def group(self, name: str, cfgs: list[dict], roles: dict[str, str]) -> Job:
        for c in cfgs:  # Table 3 adds up a group job's runs (meta is not part of the run's hash)
            c["meta"]["group"] = name
        deps = sorted({self.teacher_jobs[t].name for t in roles.values() if t in self.teacher_jobs})
        return Job(name, "train", [(c, self.sdir / "runs" / config_hash(c)) for c in cfgs], deps)

    @property
    def seeds(self) -> list[int]:
        return list(self.study.get("seeds", [0]))

    @property
    def schedule(self) -> dict:
        return {**DEFAULT_SCHEDULE, **(self.study.get("schedule") or {})}

    def distill(self) -> dict:
        d = self.study.get("distill") or {}
        return {"tau": float(d.get("tau", 1.0)), "lam": float(d.get("lam", 1.0))}


# -- expanders: one per study kind ---------------------------------------------------------

def _triplets(ctx: _Ctx) -> list[dict]:
    trs = ctx.study.get("triplets") or []
    if not trs:
        raise EffdstlError(f"study {ctx.study['name']}: kind '{ctx.study['kind']}' needs 'triplets'")
    return trs


def _baselines(ctx: _Ctx, tr: dict, seed: int) -> list[dict]:
    """acc- and acc+: the student distilled from each teacher alone (normalization anchors)."""
    d, roles = ctx.distill(), {"weak": tr["weak"], "strong": tr["strong"]}
    out = []
    for which in ("weak", "strong"):
        st = [stage(ctx.schedule, {"name": "kd", "teacher": which, **d})]
        out.append(ctx.student(tr["student"], seed, st, roles, distiller="kd", baseline=which,
                               label=f"{which} teacher only"))
    return out


def _sweep(ctx: _Ctx, cells: list[tuple[dict, dict]]) -> list[Job]:
    """Fig. 5 / 6: one group job per triplet x seed: the two single-teacher baselines, then one
    student per cell (its distiller spec, its meta)."""
    jobs = []
    for ti, tr in enumerate(_triplets(ctx)):
        roles = {"weak": tr["weak"], "strong": tr["strong"]}
        for seed in ctx.seeds:
            cfgs = _baselines(ctx, tr, seed)
            for dist, meta in cells:
                cfgs.append(ctx.student(tr["student"], seed, [stage(ctx.schedule, copy.deepcopy(dist))], roles, **meta))
            jobs.append(ctx.group(f"group-t{ti}-s{seed}", cfgs, roles))
    return jobs


def expand_replacement(ctx: _Ctx) -> list[Job]:
    """Fig. 5: every replacement scheme x subset of the grid (default: every registered scheme,
    the paper's subsets)."""
    from .targets import SCHEMES, SUBSETS, grid_defaults

    grid = ctx.study.get("grid") or {}
    cells = [({"name": "replace", "teacher": "weak", "strong": "strong", "scheme": scheme, "subset": subset,
               **ctx.distill()},
              {"distiller": "replace", "scheme": scheme, "subset": subset, "label": f"{scheme} / {subset}"})
             for scheme, subset in itertools.product(grid.get("scheme", grid_defaults(SCHEMES)),
                                                     grid.get("subset", grid_defaults(SUBSETS)))]
    return _sweep(ctx, cells)


def _manip_params(name: str, grid: dict) -> list[dict]:
    """``{param: value}`` per value of the manipulation's one parameter (``grid.params.<name>``,
    a value or a list; default: the registered default)."""
    from .targets import manipulation

    m = manipulation(name)
    vals = ((grid.get("params") or {}).get(name) or {m.param: m.default}).get(m.param)
    vals = vals if isinstance(vals, list) else [vals]
    return [{m.param: v} for v in vals]


def expand_manipulation(ctx: _Ctx) -> list[Job]:
    """Fig. 6: every manipulation (and value of its parameter) x subset of the grid (default: every
    registered manipulation, the paper's subsets). The study file's key for them is ``kind``."""
    from .targets import MANIPULATIONS, SUBSETS, grid_defaults

    grid = ctx.study.get("grid") or {}
    cells = []
    for name, subset in itertools.product(grid.get("kind", grid_defaults(MANIPULATIONS)),
                                          grid.get("subset", grid_defaults(SUBSETS))):
        for prm in _manip_params(name, grid):
            value = next(iter(prm.values()))
            cells.append(({"name": "manipulate", "teacher": "weak", "kind": name, "subset": subset, **prm,
                           **ctx.distill()},
                          {"distiller": "manipulate", "manipulation": name, "subset": subset, "param": value,
                           "label": f"{name}({value}) / {subset}"}))
    return _sweep(ctx, cells)


RECIPE_DEFAULTS = {
    "teacher1": "weak", "teacher2": "strong",
    "stage1": {"epochs": 24, "lr": 0.1, "weight_decay": 5e-4, "min_lr": 1e-5, "T": 2.0, "ls": 0.1,
               "w_ce": 1.0, "w_wsl": 0.5},
    "stage2": {"epochs": 6, "lr": 0.05, "weight_decay": 0.0, "min_lr": 5e-4, "tau_t": 0.7, "tau_s": 1.0,
               "smooth": 0.99, "subset": "reg_cor"},
}
_S1_LOSS = ("T", "ls", "w_ce", "w_wsl")
_S2_LOSS = ("tau_t", "tau_s", "smooth", "subset")


_RECIPE_SUBS = ("stage1", "stage2", "single")


def _merge_recipe(base: dict, over: dict) -> dict:
    """``over``'s keys replace ``base``'s; its stage1 / stage2 / single mappings are merged key by key."""
    out = {**base, **{k: v for k, v in over.items() if k not in _RECIPE_SUBS}}
    for s in _RECIPE_SUBS:
        out[s] = {**(base.get(s) or {}), **(over.get(s) or {})}
    return out


def _recipe(ctx: _Ctx, over: dict | None = None) -> dict:
    r = copy.deepcopy(ctx.study.get("recipe") or {})
    out = _merge_recipe(copy.deepcopy(RECIPE_DEFAULTS), r)
    if over:
        out = _merge_recipe(out, copy.deepcopy(over))
    if "student" not in out:
        raise EffdstlError(f"study {ctx.study['name']}: recipe needs 'student' (a model spec)")
    from .config import validate_schedule

    for s in _RECIPE_SUBS:  # 'single' overrides stage 1's schedule for the one-stage run
        validate_schedule(f"study {ctx.study['name']} recipe.{s}",
                          _sched({**out["stage1"], **out[s]} if s == "single" else out[s]))
    return out


def _sched(s: dict) -> dict:
    """The schedule part of a recipe stage (its loss keys and teacher removed)."""
    return {k: v for k, v in s.items() if k not in _S1_LOSS + _S2_LOSS + ("teacher",)}


def _effdstl_stages(ctx: _Ctx, r: dict, stage2_over: dict | None = None) -> tuple[list[dict], dict]:
    """Stage 1: 1.0 CE(LS 0.1) + 0.5 WSL(T=2) from teacher1; stage 2: CKM only from teacher2,
    a fresh SGD (docs/METHOD.md 'The recipe'). Returns (stages, roles)."""
    s1, s2 = r["stage1"], {**r["stage2"], **(stage2_over or {})}
    t2 = s2.pop("teacher", r["teacher2"])
    st1 = stage({**ctx.schedule, **_sched(s1)}, {"name": "wsl", "teacher": "weak", **{k: s1[k] for k in _S1_LOSS}})
    role2 = "weak" if t2 == r["teacher1"] else "strong"
    st2 = stage({**ctx.schedule, "warmup_epochs": 0, **_sched(s2)},
                 {"name": "ckm", "teacher": role2, **{k: s2[k] for k in _S2_LOSS}})
    roles = {"weak": r["teacher1"]}
    if role2 == "strong":
        roles["strong"] = t2
    return [st1, st2], roles


BASELINE_LABEL = {"none": "no distill", "kd": "KD", "rkd": "RKD", "wsl": "WSL"}


def _baseline_runs(ctx: _Ctx, r: dict, seed: int, baselines: list[str], meta: dict) -> list[dict]:
    """Table 1's comparison methods (docs/METHOD.md 'Table 1').

    no distill: one run on labels over the recipe's total epochs (stage 1's schedule stretched,
    ``recipe.single`` overriding it). KD, RKD, WSL: two stages like EffDstl — stage 1's epochs and
    schedule from teacher1, then a fresh SGD with stage 2's epochs and schedule from teacher2, the
    same loss in both (Sec. 6.1: "for comparison methods, we also change the teacher network to a
    better one for the last 60 epochs").
    """
    s1, s2 = r["stage1"], r["stage2"]
    total = int(s1["epochs"]) + int(s2["epochs"])
    d = ctx.study.get("distill") or {}
    tau, lam = float(d.get("tau", 4.0)), float(d.get("lam", 0.9))  # KD's tau and lambda (docs/METHOD.md)
    specs = {"none": {"name": "none"}, "kd": {"name": "kd", "tau": tau, "lam": lam}, "rkd": {"name": "rkd"},
             "wsl": {"name": "wsl_released"}}  # the WSL authors' released loss (docs/METHOD.md 'WSL as released')
    cfgs = []
    for b in baselines:
        if b not in specs:
            raise unknown("baseline", b, specs)
        if b == "none":
            st = [stage({**ctx.schedule, **_sched(s1), "epochs": total, **_sched(r.get("single") or {})}, specs[b])]
            roles = {}
        else:
            st = [stage({**ctx.schedule, **_sched(s1)}, {**specs[b], "teacher": "weak"}),
                  stage({**ctx.schedule, "warmup_epochs": 0, **_sched(s2)},
                         {**specs[b], "teacher": "strong" if r["teacher2"] != r["teacher1"] else "weak"})]
            roles = {"weak": r["teacher1"]}
            if r["teacher2"] != r["teacher1"]:
                roles["strong"] = r["teacher2"]
        cfgs.append(ctx.student(r["student"], seed, st, roles, distiller=b, label=BASELINE_LABEL[b], **meta))
    return cfgs


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-") or "x"


def expand_recipe(ctx: _Ctx) -> list[Job]:
    """Table 1: EffDstl and its baselines (none, KD, RKD, WSL), for every pair x setting x seed.

    ``pairs`` (optional): ``[{name, student, teacher1, teacher2}]``, else the recipe's one pair.
    ``settings`` (optional): ``[{name, stage1: {...}, stage2: {...}, single: {...}}]`` overriding
    the recipe (e.g. the paper's "100 epochs, step decay" column), else the recipe as written.
    One group job per (pair, setting, seed).
    """
    pairs = ctx.study.get("pairs") or [{}]
    settings = ctx.study.get("settings") or [{}]
    baselines = ctx.study.get("baselines", ["none", "kd", "rkd", "wsl"])
    jobs = []
    for pi, pair in enumerate(pairs):
        for setting in settings:
            r = _recipe(ctx, _merge_recipe({k: v for k, v in pair.items() if k != "name"},
                                           {k: v for k, v in setting.items() if k != "name"}))
            meta = {"pair": str(pair.get("name", "")), "setting": str(setting.get("name", ""))}
            tag = ("" if len(pairs) == 1 else f"-{_slug(pair.get('name', f'p{pi}'))}") + \
                  ("" if len(settings) == 1 else f"-{_slug(setting.get('name', ''))}")
            for seed in ctx.seeds:
                stages, roles = _effdstl_stages(ctx, r)
                cfgs = [ctx.student(r["student"], seed, stages, roles, distiller="effdstl", label="EffDstl", **meta)]
                cfgs += _baseline_runs(ctx, r, seed, baselines, meta)
                jobs.append(ctx.group(f"group{tag}-s{seed}", cfgs, roles))
    return jobs


ABLATION_DEFAULTS = [
    {"label": "EffDstl (switch, tau 0.7, CKM)", "part": "c"},
    {"label": "tau 0.8", "part": "c", "stage2": {"tau_t": 0.8}},
    {"label": "tau 1.0", "part": "c", "stage2": {"tau_t": 1.0}},
    {"label": "CKM off", "part": "d", "stage2": {"subset": None}},
    {"label": "no teacher switch", "part": "e", "stage2": {"teacher": "@teacher1"}},
]


def _variants(ctx: _Ctx, variants: list[dict]) -> list[Job]:
    """EffDstl variants: each may change the student, the two teachers and either stage.

    Variants that use the same teachers in the same roles train as one group job per seed (a
    group shares its teachers); e.g. Table 4(a)'s teacher pairs are separate groups.
    """
    jobs = []
    for seed in ctx.seeds:
        groups: dict[tuple, tuple[list[dict], dict]] = {}
        for v in variants:
            r = _recipe(ctx, {k: v[k] for k in ("student", "teacher1", "teacher2", "stage1") if k in v})
            over = dict(v.get("stage2") or {})
            if over.get("teacher") == "@teacher1":
                over["teacher"] = r["teacher1"]
            stages, roles = _effdstl_stages(ctx, r, over)
            sub = stages[1]["distiller"]["subset"]
            cfg = ctx.student(r["student"], seed, stages, roles, distiller="effdstl", subset=sub or "",
                              param=stages[1]["distiller"]["tau_t"], label=v["label"], part=str(v.get("part", "")))
            key = tuple(sorted(roles.items()))
            groups.setdefault(key, ([], roles))[0].append(cfg)
        for gi, (cfgs, roles) in enumerate(groups.values()):
            jobs.append(ctx.group(f"group-s{seed}" if len(groups) == 1 else f"group-t{gi}-s{seed}", cfgs, roles))
    return jobs


def expand_ablation(ctx: _Ctx) -> list[Job]:
    """Table 4: (a) teacher pairs, (c) stage-2 tau in {0.7, 0.8, 1.0}, (d) CKM on/off, (e) teacher
    switch or not; each variant says its ``part``. (b), continuing with MEAL V2, is not run."""
    return _variants(ctx, ctx.study.get("ablations") or ABLATION_DEFAULTS)


def expand_fig8(ctx: _Ctx) -> list[Job]:
    """Fig. 8: CKM on reg AND correct (keep incorrect samples) vs on all reg samples."""
    return _variants(ctx, [{"label": "keep incorrect (reg_cor)", "stage2": {"subset": "reg_cor"}},
                           {"label": "manipulate incorrect (reg)", "stage2": {"subset": "reg"}}])


FGSM_DISTILLER = {"name": "manipulate", "teacher": "weak", "kind": "label_smoothing", "t": 0.9, "subset": "reg_cor"}


def _undistilled(ctx: _Ctx, student: str) -> dict:
    """Fig. 7's undistilled network: ``probe.undistilled`` — a model spec trained here on labels
    (same schedule as the distilled run), or ``{model, pretrained: true}`` (hub weights, e.g. the
    paper's MobileNet on ImageNet). Default: the student's architecture, trained here."""
    u = (ctx.study.get("probe") or {}).get("undistilled", student)
    return {"model": u} if isinstance(u, str) else dict(u)


def expand_fgsm(ctx: _Ctx) -> list[Job]:
    """Fig. 7 (docs/METHOD.md 'Fig. 7'): one distilled run that manipulates with label smoothing on
    reg AND correct samples (Sec. 4.2), and an undistilled network of its own model spec, per seed."""
    tr = _triplets(ctx)[0]
    roles = {"weak": tr["weak"], "strong": tr["strong"]}
    probe = ctx.study.get("probe") or {}
    dist = {**FGSM_DISTILLER, **ctx.distill(), **(probe.get("distiller") or {})}
    und = _undistilled(ctx, tr["student"])
    jobs = []
    for seed in ctx.seeds:
        cfgs = [ctx.student(tr["student"], seed, [stage(ctx.schedule, dist)], roles, label="distilled",
                            **distiller_meta(dist))]
        if not und.get("pretrained"):
            cfgs.append(ctx.student(und["model"], seed, [stage(ctx.schedule, {"name": "none"})], {},
                                    distiller="none", label="undistilled"))
        jobs.append(ctx.group(f"group-s{seed}", cfgs, roles))
    return jobs


EXPANDERS: dict[str, Callable[[_Ctx], list[Job]]] = {
    "replacement": expand_replacement, "manipulation": expand_manipulation, "recipe": expand_recipe,
    "ablation": expand_ablation, "fig8": expand_fig8, "fgsm": expand_fgsm,
}


def check_study_kind(sdir: Path, kind: str) -> None:
    """One results folder holds one study: a name already used by a study of another kind (its
    study.yaml says so) is refused, so their runs, tables and figures never mix."""
    import yaml

    f = sdir / "study.yaml"
    try:
        had = yaml.safe_load(f.read_text()) if f.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    old = had.get("kind") if isinstance(had, dict) else None
    if isinstance(old, str) and old != kind:
        raise EffdstlError(f"study name '{sdir.name}' is already used by a study of kind '{old}' ({sdir}); this one "
                           f"is of kind '{kind}': give it another name")


def plan(study: dict, results_root: str | Path = "results") -> Plan:
    """Expand a validated study into its jobs (teachers first, then groups)."""
    sdir = study_dir(results_root, study["name"])
    check_study_kind(sdir, study["kind"])
    ctx = _Ctx(study, sdir)
    groups = EXPANDERS[study["kind"]](ctx)
    used = {d for g in groups for d in g.deps}
    teachers = [j for j in ctx.teacher_jobs.values() if j.name in used]
    return Plan(study, sdir, teachers + groups)


def validate_runs(p: Plan) -> None:
    """Check every run's names and parameters (dataset, models, distillers) before anything trains,
    so a typo in a study fails in one line instead of after its teachers have trained."""
    from .data.spec import check_dataset_spec  # the torch-free checks: a dry run imports no torch
    from .distillers import build_distiller
    from .modelspec import check_model_spec

    where: dict[Path, str] = {}
    for j in p.jobs:
        for cfg, d in j.runs:
            label = f"{j.name} ({cfg.get('meta', {}).get('label', '')})"
            if d in where:  # two runs with one config would wait on (or fail at) their own lock
                raise EffdstlError(f"study {p.study.get('name')}: {where[d]} and {label} are the same run {d.name} "
                                   "(identical configs: a duplicated teacher, grid value or seed); make them differ "
                                   "or list it once")
            where[d] = label
    seen: set[str] = set()
    for j in p.jobs:
        for cfg, _ in j.runs:
            check_dataset_spec(cfg["dataset"])
            for spec in [cfg["model"]] + [t["model"] for t in (cfg.get("teachers") or {}).values()]:
                if spec not in seen:
                    check_model_spec(spec)
                    seen.add(spec)
            for st in cfg["stages"]:
                warm = st["sched"].get("warmup_epochs", 0)
                if warm >= st["epochs"] and warm > 0:  # checked on the resolved stage: defaults merged
                    raise EffdstlError(f"study {p.study.get('name')}: {j.name} ({cfg.get('meta', {}).get('label', '')}) "
                                       f"has warmup_epochs {warm:g} in a stage of {st['epochs']} epochs; the warm-up "
                                       "must be shorter than the stage")
                d = st["distiller"]
                try:
                    build_distiller(d)
                except (TypeError, ValueError) as exc:  # e.g. tau: abc
                    raise EffdstlError(f"study {p.study.get('name')}: bad parameters for distiller "
                                       f"'{d.get('name')}' {d} ({type(exc).__name__}: {exc})") from None


def distiller_meta(dist: dict) -> dict:
    """A run's meta columns that say what its distiller does: the distiller, and where it has one,
    its replacement scheme, manipulation (with its parameter's value) and subset."""
    from .targets import MANIPULATIONS

    manip = dist.get("kind", "") if dist["name"] == "manipulate" else ""
    param = dist.get(MANIPULATIONS[manip].param) if manip in MANIPULATIONS else None
    return {"distiller": dist["name"], "scheme": dist.get("scheme", ""), "manipulation": manip,
            "subset": dist.get("subset", "") or "", "param": param}


def probe_targets(p: Plan) -> list[dict]:
    """The runs an FGSM probe can attack: distilled runs whose last stage alters a subset.

    For each: the run, the teacher (the one whose target was altered), the subset rule and the
    undistilled run of the same seed (a 'none' run of the study, if any).
    """
    runs = [(c, d) for j in p.jobs if j.work == "train" for c, d in j.runs if c["role"] == "student"]
    nones: dict = {}
    for c, d in runs:  # a run labelled 'undistilled' (fgsm studies) wins over any other 'none' run
        if c["stages"][-1]["distiller"]["name"] == "none" and (c["meta"].get("label") == "undistilled"
                                                             or c["seed"] not in nones):
            nones[c["seed"]] = d
    und = (p.study.get("probe") or {}).get("undistilled")
    hub = dict(und) if isinstance(und, dict) and und.get("pretrained") else None
    from .distillers import REGISTRY

    out = []
    for c, d in runs:
        dist = c["stages"][-1]["distiller"]
        if not REGISTRY[dist["name"]].alters_subset or not dist.get("subset"):
            continue
        if c["meta"].get("baseline"):
            continue
        tau = float(dist.get("tau_t", dist.get("tau", 1.0)))
        out.append({"run": d, "cfg": c, "teacher": dist["teacher"], "subset": dist["subset"], "tau": tau,
                    "tau_s": float(dist.get("tau_s", dist.get("tau", 1.0))),
                    "undistilled": None if hub else nones.get(c["seed"]), "undistilled_hub": hub})
    return out


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def describestage(stage: dict, teachers: dict | None = None) -> str:
    """One stage in a line: epochs, the loss with every hyper-parameter and its teacher, the schedule.

    e.g. ``240 ep wsl[T 2, ls 0.1, w_ce 1, w_wsl 0.5; teacher weak=tv:resnet34] lr 0.5->1e-05 cos wd 4e-05``
    """
    d = dict(stage["distiller"])
    from .distillers import REGISTRY  # every hyper-parameter, the defaults a spec leaves out included (RKD's weights)

    if d.get("name") in REGISTRY:
        d = {**{k: v for k, v in REGISTRY[d["name"]].defaults().items() if v is not None}, **d}
    name, role = d.pop("name"), d.pop("teacher", None)
    strong = d.pop("strong", None) if name == "replace" else None
    hp = ", ".join(f"{k} {_fmt(v) if v is not None else 'none'}" for k, v in d.items())
    who = []
    for r in (role, strong):
        if r:
            who.append(f"{r}={(teachers or {}).get(r, {}).get('model', '?')}")
    loss = name + ("[" + "; ".join(x for x in (hp, ("teacher " + ", ".join(who)) if who else "") if x) + "]"
                   if hp or who else "")
    o, sc = stage["optim"], stage.get("sched", {})
    if sc.get("kind") == "step":
        lr = (f"lr {_fmt(o['lr'])} step x{_fmt(sc.get('gamma', 0.1))} at "
              + ",".join(_fmt(m) for m in sc.get("milestones") or []))
    else:
        lr = f"lr {_fmt(o['lr'])}->{_fmt(sc.get('min_lr', 0.0))} cos"
    warm = f" warmup {_fmt(sc['warmup_epochs'])}" if sc.get("warmup_epochs") else ""
    return f"{stage['epochs']} ep {loss} {lr}{warm} wd {_fmt(o['weight_decay'])}"


def describe_run(cfg: dict) -> str:
    """A run's stages, ' | '-separated (the dry run's line per run)."""
    return " | ".join(describestage(s, cfg.get("teachers")) for s in cfg["stages"])


# -- single runs (effdstl train teacher / student) ----------------------------------------------

def resolve_teacher(text: str, option: str = "--teacher") -> dict:
    """A teacher reference from: a model.pt, a run directory, a study folder with one teacher run,
    or a hub model ``timm:NAME`` / ``tv:NAME`` (pretrained). Messages name ``option``."""
    if text.startswith(("timm:", "tv:")):
        return {"model": text, "pretrained": True}
    from .rundir import RunDir, run_of

    p = Path(text)
    if p.is_dir():
        if (p / "config.yaml").exists() or (p / "model.pt").exists():  # a run directory
            p = p / "model.pt"
        else:  # a study folder: its one teacher run
            cands = [d for d in sorted(p.glob("runs/*/")) if (d / "config.yaml").exists()
                     and RunDir(d).config.get("role") == "teacher"]
            if len(cands) != 1:
                shown = f" ({', '.join(d.name for d in cands[:6])}: pass one run directory)" if cands else ""
                raise EffdstlError(f"{option} {text}: expected one teacher run under it, found {len(cands)}{shown}")
            p = cands[0] / "model.pt"
    run = run_of(p)
    if run is not None:  # the model.pt of a run: that run must be finished and intact (the seal)
        run.require_finished(f"{option} {text}")
    if not p.exists():
        raise EffdstlError(f"{option} {text}: no such checkpoint or run directory")
    if not p.is_file():
        raise EffdstlError(f"{option} {text}: {p} is not a regular file; pass a run's model.pt or its folder")
    from .modelspec import read_saved_spec

    spec = read_saved_spec(p)  # our own model.pt, without torch (a dry run); else torch reads it
    if not spec:
        from .models import saved_spec

        spec = saved_spec(p)
    if not spec:
        raise EffdstlError(f"{option} {text}: the checkpoint does not say its model; pass a run's model.pt")
    return {"model": spec, "ckpt": str(p.resolve())}


def single_plan(name: str, data: dict, model: str, seed: int, batch_size: int, sched: dict,
                distillers: list[dict], teachers: dict, role: str, results_root: str | Path) -> Plan:
    """One group job of single runs (``effdstl train teacher`` / ``student``): one run per distiller
    spec, all on ``data`` (dataset, data_root, image_size) with one schedule; ``teachers`` by role
    (from :func:`resolve_teacher`). A spec without a teacher gets its distiller's default one."""
    from .config import validate_schedule

    from .config import check_study_name, is_seed

    sched = {k: v for k, v in sched.items() if v is not None}
    validate_schedule("command line", sched)
    if data.get("image_size") is not None and data["image_size"] < 1:
        raise EffdstlError(f"--image-size must be a positive number of pixels, got {data['image_size']}")
    if not is_seed(seed):
        raise EffdstlError(f"--seed must be an integer {'>= 0' if seed < 0 else '< 2**32'}, got {seed}")
    sdir = study_dir(results_root, name)  # first: a path out of the root is named as such
    check_study_name(name, "--name")
    check_study_kind(sdir, role)
    from .distillers import build_distiller, with_teacher  # imports torch: after the cheap checks

    runs = []
    for d in distillers:
        d = with_teacher(d, teachers)
        dist = build_distiller(d)  # validates names and parameters before anything trains
        for t in dist.teachers:
            if t not in teachers:
                raise EffdstlError(f"distiller '{d['name']}' reads teacher '{t}': pass --teacher PATH"
                                   + (" and --strong PATH" if t == "strong" else ""))
        label = d["name"] + "".join(f" {k}={v}" for k, v in d.items() if k not in ("name", "teacher"))
        meta = {"study": name, "study_kind": role, "dataset": data["dataset"], "student": model,
                "weak": teachers.get("weak", {}).get("model", ""), "strong": teachers.get("strong", {}).get("model", ""),
                "triplet": "", **distiller_meta(d), "baseline": "", "label": label, "seed": seed}
        cfg = run_config(role, data, model, seed, batch_size, [stage(sched, d)],
                         {t: teachers[t] for t in dist.teachers}, meta)
        runs.append((cfg, sdir / "runs" / config_hash(cfg)))
    study = {"name": name, "kind": role, "dataset": data["dataset"]}
    return Plan(study, sdir, [Job(f"{role}-group", "train", runs)])


# -- probes (effdstl attack fgsm) -----------------------------------------------------------------

DEFAULT_EPS = (0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255)  # FGSM steps in pixel units (attack.run_probe)


def add_probes(p: Plan, n: int, eps: list[float], forget_stale: bool = True) -> list[dict]:
    """Append one FGSM probe job per :func:`probe_targets` run (after the job that trains it);
    returns the targets. A probe table made with another ``n`` or ``eps`` is deleted (redone, not
    skipped as done) unless ``forget_stale`` is false (a dry run)."""
    targets = probe_targets(p)
    if not targets:
        raise EffdstlError(f"study {p.study.get('name')} has no distilled run with an altered subset to probe")
    train_jobs = list(p.jobs)
    for tgt in targets:
        tgt.update(n=n, eps=eps, seed=tgt["cfg"]["seed"],
                   out=str(p.study_dir / "fgsm" / tgt["run"].name / "fgsm.parquet"))
        if forget_stale:
            _drop_stale_probe(Path(tgt["out"]), n, eps)
        job_of = next(j.name for j in train_jobs if any(d == tgt["run"] for _, d in j.runs))
        p.jobs.append(Job(f"probe-{tgt['run'].name}", "probe", [], [job_of], tgt))
    return targets


def _drop_stale_probe(out_path: Path, n: int, eps: list) -> None:
    from .files import read_json

    if not out_path.exists():
        return
    try:
        j = read_json(out_path.with_suffix(".json"))
        same = int(j.get("n", -1)) == n and [round(float(e), 12) for e in j.get("eps", [])] == [round(float(e), 12) for e in eps]
    except (OSError, ValueError):
        same = False
    if not same:
        out_path.unlink()


# -- the preflight: every model of the plan, once, on the CPU, before any job --------------------

MAX_PARAMS = 500_000_000  # a spec past this is a typo (mlp:100000-...), not a network to train here


def _data_shape(cfg: dict) -> tuple[int, int, int, tuple, tuple] | None:
    """(classes, channels, image size, mean, std) of a run's data, read cheaply: an in-memory dataset
    is loaded (its errors, e.g. an npz without x_train, are named now); an image folder is not
    decoded here, only its class folders counted (a folder not laid out as one is loaded, which
    names what is missing at once). None where only the job can tell."""
    from .data import data_for
    from .data.datasets import _STATS

    kind, _, arg = str(cfg["dataset"]).partition(":")
    if kind.lower() in ("folder", "imagenet"):
        root = Path(arg).expanduser()
        n = sum(1 for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if (root / "train").is_dir() else 0
        if not n or not ((root / "val").is_dir() or (root / "test").is_dir()):
            data_for(cfg)  # raises the layout's one line before it reads a file
            return None
        mean, std = _STATS["imagenet"]
        return n, 3, int(cfg.get("image_size") or 224), mean, std
    d = data_for(cfg)
    return d.num_classes, d.in_chans, d.image_size, d.mean, d.std


def preflight_models(p: Plan) -> None:
    """Before any job of a real launch: every model the unfinished jobs will build (students,
    teachers, probes' undistilled networks) is built once on the CPU, its size checked on the meta
    device first, and run forward on one batch of the real data's shape; a teacher checkpoint is
    loaded into it (wrong architecture, other classes, NaN weights). So a model that cannot take
    the data (1x1 images into cnn:small) fails in seconds, in one line, not after its teachers
    trained. torch is imported here only: dry runs and planning stay torch-free."""
    import torch

    from .models import build_model, count_params, load_checkpoint
    from .rundir import RunDir

    todo = [j for j in p.jobs if j.state() != "done"]
    wanted: dict[tuple, tuple[dict, dict]] = {}  # (spec, data) -> (model ref, a run config of that data)
    for j in todo:
        runs = [(j.probe["cfg"], None)] if j.work == "probe" else j.runs
        for cfg, _ in runs:
            dkey = repr(sorted(data_keys(cfg).items()))
            refs = [{"model": cfg["model"]}] + list((cfg.get("teachers") or {}).values())
            if j.work == "probe" and j.probe.get("undistilled_hub"):
                refs.append({"model": j.probe["undistilled_hub"]["model"]})
            for ref in refs:
                ckpt = ref.get("ckpt") if (not ref.get("run") or RunDir(Path(ref["ckpt"]).parent).state() == "done") else None
                wanted.setdefault((ref["model"], ckpt, dkey), (ref, cfg))
    shapes: dict[str, tuple | None] = {}
    for (spec, ckpt, dkey), (ref, cfg) in wanted.items():
        if dkey not in shapes:
            shapes[dkey] = _data_shape(cfg)
        shape = shapes[dkey]
        if shape is None:
            continue
        classes, chans, size, mean, std = shape
        what = f"model {spec} on {cfg['dataset']} ({classes} classes, {chans}x{size}x{size} images)"
        try:
            with torch.device("meta"):  # parameters without memory: a 640M-parameter typo costs nothing
                n = count_params(build_model(spec, classes, chans, size, mean, std))
        except EffdstlError:
            raise
        except Exception:  # noqa: BLE001 - a body that cannot be built on meta: counted when built below
            n = None
        if n is not None and n > MAX_PARAMS:
            raise EffdstlError(f"{what} has {n / 1e6:.0f}M parameters, more than the {MAX_PARAMS / 1e6:.0f}M "
                               "effdstl trains (a typo in the spec?)")
        try:
            net = build_model(spec, classes, chans, size, mean, std)
            if ckpt:
                load_checkpoint(net, ckpt)
            with torch.no_grad():
                logits, _ = net.eval()(torch.rand(2, chans, size, size), features=True)
        except EffdstlError:
            raise
        except Exception as exc:  # noqa: BLE001 - the layers do not fit this input: one line, why
            why = " ".join(str(exc).split())[:300]
            raise EffdstlError(f"{what} cannot run: {type(exc).__name__}: {why}") from None
        if tuple(logits.shape) != (2, classes):
            raise EffdstlError(f"{what} gives outputs of shape {tuple(logits.shape[1:])}, not ({classes},)")
