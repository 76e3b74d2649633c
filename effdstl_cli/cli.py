"""The ``effdstl`` command: a thin Typer layer over the library (no science here).

Every user-fixable problem reaches the user as one line ``error: ...`` and exit code 2.
"""


import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import EffdstlError

# emoji=False: user text (labels, paths, names) is printed as written: ':thumbs_up:' stays text
console = Console(stderr=True, emoji=False)
out = Console(width=None if sys.stdout.isatty() else 140, emoji=False)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run the studies of Song et al. (ACM MM 2023, EffDstl): what a strong teacher "
                       "transfers that a weak one does not. Locally, or on Slurm.")
train_app = typer.Typer(no_args_is_help=True, help="Train a teacher, a group of students, or the EffDstl recipe.")
sweep_app = typer.Typer(no_args_is_help=True, help="Fig. 5 / Fig. 6 sweeps: replacement or manipulation on subsets.")
attack_app = typer.Typer(no_args_is_help=True, help="Boundary probes (Fig. 7).")
app.add_typer(train_app, name="train")
app.add_typer(sweep_app, name="sweep")
app.add_typer(attack_app, name="attack")

RESULTS = typer.Option("results", "--results", help="Results root (one folder per study).")
VERBOSE = typer.Option(False, "--verbose", "-v", help="With --dry-run: list every run of every job "
                       "(default: the first three per job).")
SETS = typer.Option(None, "--set", help="Override a study key, e.g. --set schedule.epochs=5 --set seeds=[0,1].")


def _version(value: bool):
    if value:
        out.print(f"effdstl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


# -- launch plumbing -------------------------------------------------------------------------

class LaunchArgs:
    """The options every launching command shares: the library's LaunchOptions and --rerun."""

    def __init__(self, opts, rerun=None):
        self.opts, self.rerun = opts, list(rerun or [])


def launch_options(
    executor: str = typer.Option("local", "--executor", "-x", help="debug (this process) | local (submitit subprocesses) | slurm."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    tasks: int = typer.Option(1, "--tasks", help="Processes per job (DDP; gloo on CPU)."),
    gpus_per_job: Optional[int] = typer.Option(None, "--gpus-per-job", help="GPUs per job = one DDP job (nccl). Use 4 on a GPU cluster."),
    partition: Optional[str] = typer.Option(None, "--partition", help="Slurm partition."),
    account: Optional[str] = typer.Option(None, "--account", help="Slurm account."),
    qos: Optional[str] = typer.Option(None, "--qos", help="Slurm QOS."),
    timeout_min: int = typer.Option(24 * 60, "--timeout-min", help="Per job; a job past it requeues and resumes."),
    array_parallelism: int = typer.Option(16, "--array-parallelism", help="Slurm: jobs of an array running at once."),
    max_parallel: Optional[int] = typer.Option(None, "--max-parallel", help="Local: jobs at once (default: 1 on CPU, one per GPU)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile students and teachers (GPU)."),
    workers: int = typer.Option(4, "--workers", help="DataLoader workers for on-disk image folders."),
    decode: str = typer.Option("auto", "--decode", help="Image folders: device (workers read bytes, the GPU decodes "
                               "and augments) | workers (PIL in the workers) | mixed:F (PIL decodes the share F "
                               "of each batch, the GPU the rest) | auto (device on a GPU). "
                               "`effdstl bench --device cuda --only d` measures them and suggests F."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait for the jobs and show progress."),
    rerun: Optional[List[str]] = typer.Option(None, "--rerun", help="Forget run RUN (its hash, as `effdstl status` "
                                              "shows it) and train it again: the cure for a damaged or failed run. Repeat for several."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Image folders: decode every file before "
                                         "training and leave out the ones that cannot be decoded (counted in each "
                                         "run's final.json); without it the first bad file stops the run, named."),
    fuse: str = typer.Option("auto", "--fuse", help="Students of one architecture and schedule as one horizontally "
                             "fused model: auto (MLPs always; convolutional students on a GPU at <= 64 px; what "
                             "`effdstl bench` measures) | on | off (one after another). --dry-run shows the choice."),
) -> LaunchArgs:
    from .launch import LaunchOptions

    return LaunchArgs(LaunchOptions(executor=executor, device=device, tasks=tasks, gpus_per_job=gpus_per_job,
                                    partition=partition, account=account, qos=qos, timeout_min=timeout_min,
                                    array_parallelism=array_parallelism, max_parallel=max_parallel,
                                    compile=compile_, workers=workers, decode=decode, wait=wait,
                                    skip_bad_images=skip_bad_images, fuse=fuse), rerun)


def _progress_poller(plan):
    """Progress bars from the run directories alone: the same for every executor."""
    from .rundir import RunDir

    runs = [(c, RunDir(d)) for j in plan.jobs if j.work == "train" for c, d in j.runs]
    total_ep = sum(int(c["epochs"]) for c, _ in runs)
    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)
    t_runs = prog.add_task("runs finished", total=len(runs))
    t_ep = prog.add_task("epochs trained", total=total_ep)

    last = [0.0]

    def poll(force: bool = False):
        if not force and time.time() - last[0] < 0.5:  # debug runs call this every epoch
            return
        last[0] = time.time()
        states = [(c, r, r.state()) for c, r in runs]
        done = sum(st == "done" for _, _, st in states)
        eps = sum(int(c["epochs"]) if st == "done" else r.epochs_done() for c, r, st in states)
        prog.update(t_runs, completed=done)
        prog.update(t_ep, completed=eps)

    return prog, poll


def _run_plan(plan, la: LaunchArgs, dry_run: bool, verbose: bool = False) -> None:
    from .launch import apply_study_defaults, dry_run_lines, launch, preflight, refuse_damaged
    from .studies import validate_runs

    apply_study_defaults(plan, la.opts)
    la.opts.validate()
    validate_runs(plan)  # a misspelt name fails here, before any teacher trains
    if dry_run:
        for line in dry_run_lines(plan, la.opts, verbose):
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        return
    reruns = _reruns(plan, la.rerun)
    preflight(plan, la.opts)  # e.g. --executor slurm without a cluster: one line, before any progress
    from .studies import preflight_models

    preflight_models(plan)  # every model once, on one batch of the data's shape: seconds, before any job
    _check_writable(plan.study_dir, [d for j in plan.jobs if j.work == "train" for _, d in j.runs])
    for run in reruns:
        run.clear()
        console.print(f"--rerun {run.name}: its old files are gone; it trains again", highlight=False, markup=False)
    refuse_damaged(plan)  # before any progress: one line
    prog, poll = _progress_poller(plan)
    poll_fn = poll if la.opts.wait else None
    t0 = time.time()
    poll()  # before the bars first show: runs finished earlier count from the first frame (2/5, not 0/5)
    try:
        with prog:
            outcome = launch(plan, la.opts, report=lambda m: prog.console.print(m, highlight=False, markup=False),
                             on_poll=poll_fn)
            poll(force=True)
    except KeyboardInterrupt as exc:  # Ctrl-C, or `kill` (SIGTERM, see main): the contract of RELIABILITY.md
        jobs = getattr(exc, "jobs", None)
        stopped = (f"stopped {len(jobs)} local job(s) ({', '.join(jobs)}); " if jobs else
                   "no local job was running; " if jobs is not None else "")
        raise Interrupted(f"{stopped}finished epochs are saved; run the same command again to resume",
                          getattr(exc, "signum", 2)) from None
    bad = {k: v for k, v in outcome.items() if isinstance(v, str) and (v.startswith("failed") or v.startswith("skipped"))}
    if outcome and la.opts.wait:
        console.print(f"study '{plan.study['name']}': {len(outcome)} job(s) ran in {time.time() - t0:.0f} s; "
                      f"results in {plan.study_dir}")
    if bad:
        raise EffdstlError(f"{len(bad)} job(s) did not finish: " + "; ".join(f"{k}: {v}" for k, v in bad.items()))
    if la.opts.wait:
        _raise_failed_runs(plan)


def _reruns(plan, names: list[str]) -> list:
    """The runs of ``--rerun``: hashes of this plan's training runs (a misspelt one: did-you-mean)."""
    from .errors import unknown
    from .rundir import RunDir

    have = {d.name: d for j in plan.jobs if j.work == "train" for _, d in j.runs}
    out = []
    for name in names:
        if name not in have:
            raise unknown(f"run of study '{plan.study['name']}' for --rerun", name, have)
        run = RunDir(have[name])
        why = run.clear_problem()  # every named run is checked before the first one is cleared
        if why:
            raise EffdstlError(why)
        out.append(run)
    return out


def _check_writable(d: Path, run_dirs: list[Path] = ()) -> None:
    """The study folder, and every run folder already there, can be written (a job writes its
    lock and checkpoints there), or one clear line naming the folder and the cause, before anything
    runs (in a job it would surface as the job's failure, or as a lock it could not take)."""
    import tempfile

    runs = [d / "runs"] if (d / "runs").is_dir() else []  # where each new run's folder is made
    for where in [d, *runs, *(r for r in run_dirs if r.is_dir() and not (r / "final.json").exists())]:
        try:
            where.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=where):
                pass
        except OSError as exc:
            what = "results directory" if where == d or where in runs else "run directory"
            raise EffdstlError(f"{what} {where} is not writable ({exc.strerror or exc})") from None


def _raise_failed_runs(plan) -> None:
    """Runs stopped on an error (failed.json: NaN loss, ...) make the command fail, every time it runs."""
    from .rundir import RunDir

    failed = [(c, d) for j in plan.jobs if j.work == "train" for c, d in j.runs if RunDir(d).state() == "failed"]
    if not failed:
        return

    def why(d):
        return (RunDir(d).failed or {}).get("reason", "?")

    shown = "; ".join(f"{d.name} ({c.get('meta', {}).get('label', '')}): {why(d)}" for c, d in failed[:5])
    raise EffdstlError(f"{len(failed)} run(s) of study '{plan.study['name']}' failed and are kept as failed "
                       f"(the others finished; `effdstl status` lists them; delete a run's failed.json to "
                       f"retry it): {shown}" + (" ..." if len(failed) > 5 else ""))


def _load_plan(study: Path, sets, results: str, kinds: tuple[str, ...] | None = None):
    from .config import load_study
    from .studies import plan

    s = load_study(study, sets)
    if kinds and s["kind"] not in kinds:
        raise EffdstlError(f"study {study} is of kind '{s['kind']}'; this command runs {' or '.join(kinds)} "
                           f"studies (use `effdstl run --study {study}` for any kind)")
    return plan(s, results)


# -- sweeps and studies ------------------------------------------------------------------------

def _with_launch(fn):
    """Attach the shared launch options to a command (Typer has no dependency injection)."""
    import functools
    import inspect

    params = list(inspect.signature(fn).parameters.values())
    lparams = list(inspect.signature(launch_options).parameters.values())
    sig = inspect.signature(fn).replace(parameters=[p for p in params if p.name != "la"] + lparams)

    @functools.wraps(fn)
    def wrapper(**kw):
        lkw = {p.name: kw.pop(p.name) for p in lparams}
        return fn(la=launch_options(**lkw), **kw)

    wrapper.__signature__ = sig
    return wrapper


def _study_command(typer_app, name: str, kinds: tuple[str, ...] | None, example: str, doc: str):
    """A command that runs a study file of ``kinds`` (None: any) to the end."""
    def command(study: Path = typer.Option(..., "--study", "-s", help=example),
                sets: Optional[List[str]] = SETS, results: str = RESULTS,
                dry_run: bool = typer.Option(False, "--dry-run", help="Print the DAG and the jobs; submit nothing."),
                verbose: bool = VERBOSE,
                la: LaunchArgs = None):
        _run_plan(_load_plan(study, sets, results, kinds), la, dry_run, verbose)

    command.__doc__ = doc
    command.__name__ = command.__qualname__ = f"{name}_command"
    return typer_app.command(name)(_with_launch(command))


sweep_replacement = _study_command(
    sweep_app, "replacement", ("replacement",), "A study file, e.g. studies/figure5-digits.yaml.",
    "Fig. 5: replace the weak teacher's targets with the strong one's on a subset (full / partial / confidence).")
sweep_manipulation = _study_command(
    sweep_app, "manipulation", ("manipulation",), "A study file, e.g. studies/figure6-digits.yaml.",
    "Fig. 6: label smoothing / teacher amplification / student amplification on a subset.")
run_study = _study_command(
    app, "run", None, "Any study file in studies/.",
    "Run any study (replacement, manipulation, recipe, ablation, fig8, fgsm) to the end.")
train_recipe = _study_command(
    train_app, "recipe", ("recipe", "ablation", "fig8"), "e.g. studies/table1-digits.yaml.",
    """EffDstl (Table 1): stage 1 WSL from the weak teacher, stage 2 CKM from a stronger one, in one
    resumable run, with the baselines (no distill: one run; KD / RKD / WSL: the same two stages and
    teacher switch, their own loss). Also runs Table 4 (ablation) and Fig. 8 studies (docs/METHOD.md).""")


# -- single runs ------------------------------------------------------------------------------

def _parse_distiller(text: str) -> dict:
    """``kd`` or ``kd:tau=4,lam=0.9`` or ``replace:scheme=full,subset=reg_cor``."""
    name, _, rest = text.partition(":")
    spec: dict = {"name": name.strip()}
    for item in filter(None, rest.split(",")):
        if "=" not in item:
            raise EffdstlError(f"--distiller {text}: parameters are key=value, got '{item}'")
        k, v = item.split("=", 1)
        if k.strip() in spec:  # kd:tau=2,tau=3 - which one was meant?
            raise EffdstlError(f"--distiller {text}: '{k.strip()}' is given twice")
        try:
            spec[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise EffdstlError(f"--distiller {text}: the value of '{k.strip()}' ({v}) is not a number or a name") from None
    return spec


def _text(value):
    """A table cell of user text (a label, a model spec): shown as written, never read as markup."""
    from rich.text import Text

    return Text(str(value))


def _print_runs(plan) -> None:
    from .rundir import RunDir

    t = Table(title=f"{plan.study['name']}  ({plan.study_dir})", title_justify="left")
    for col in ("run", "model", "distiller", "last top-1", "best top-1 (chosen on test)", "epochs", "wall s"):
        t.add_column(col, no_wrap=True)
    for j in plan.jobs:
        for c, d in j.runs:
            r = RunDir(d).final if RunDir(d).state() == "done" else {}
            t.add_row(d.name, _text(c["model"]), _text(c["meta"]["label"]), f"{r.get('last_top1', float('nan')):.2f}",
                      f"{r.get('best_top1', float('nan')):.2f}", str(r.get("epochs", "-")), str(r.get("wall_s", "-")))
    out.print(t)
    for j in plan.jobs:
        for c, d in j.runs:
            if (d / "model.pt").exists():
                out.print(f"{c['meta']['label']}: {d / 'model.pt'}", highlight=False, markup=False, soft_wrap=True)


SCHED_OPTS = dict(
    epochs=typer.Option(10, "--epochs", help="Training epochs."),
    lr=typer.Option(0.1, "--lr", help="Peak learning rate (SGD, momentum 0.9, cosine)."),
    weight_decay=typer.Option(5e-4, "--weight-decay", help="Weight decay."),
    warmup_epochs=typer.Option(0.0, "--warmup-epochs", help="Linear warm-up epochs."),
    batch_size=typer.Option(64, "--batch-size", help="Global batch size."),
)
DATA_ROOT = typer.Option(None, "--data-root", help="Where torchvision datasets live / download to.")
IMAGE_SIZE = typer.Option(None, "--image-size", help="Folder/ImageNet crop size (default 224).")
SEED = typer.Option(0, "--seed", help="Init, batch order and augmentation.")
AUGMENT = typer.Option(True, "--augment/--no-augment", help="Train with the dataset's augmentation (CIFAR: crop + flip).")
DRY_RUN_JOBS = typer.Option(False, "--dry-run", help="Print the job(s); train nothing.")


def _train_single(name: str, dataset: str, data_root, image_size, augment: bool, model: str, seed: int, sched: dict,
                  specs: list[dict], teachers: dict, role: str, results: str, la, dry_run: bool, verbose: bool) -> None:
    from .studies import single_plan

    data = {"dataset": dataset, "data_root": data_root, "image_size": image_size, "augment": augment}
    plan = single_plan(name, data, model, seed,
                       sched["batch_size"], sched, specs, teachers, role, results)
    _run_plan(plan, la, dry_run, verbose)
    if not dry_run:
        _print_runs(plan)


@train_app.command("teacher")
@_with_launch
def train_teacher(dataset: str = typer.Option("digits", "--dataset", "-d", help="digits | synthetic | cifar10 | cifar100 | mnist | fashion-mnist | npz:PATH | folder:PATH | imagenet:PATH."),
                  model: str = typer.Option(..., "--model", "-m", help="e.g. mlp:256-256, resnet56, wrn_40_2, timm:resnet34d, tv:resnet34."),
                  name: Optional[str] = typer.Option(None, "--name", help="Folder under the results root (default teacher-<dataset>)."),
                  data_root: Optional[str] = DATA_ROOT, image_size: Optional[int] = IMAGE_SIZE, augment: bool = AUGMENT,
                  seed: int = SEED,
                  epochs: int = SCHED_OPTS["epochs"], lr: float = SCHED_OPTS["lr"],
                  weight_decay: float = SCHED_OPTS["weight_decay"], warmup_epochs: float = SCHED_OPTS["warmup_epochs"],
                  batch_size: int = SCHED_OPTS["batch_size"], results: str = RESULTS,
                  dry_run: bool = DRY_RUN_JOBS, verbose: bool = VERBOSE, la: LaunchArgs = None):
    """Train one teacher on labels; prints where its model.pt is (pass it to --teacher)."""
    sched = {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "batch_size": batch_size}
    _train_single(name or f"teacher-{dataset.split(':')[0]}", dataset, data_root, image_size, augment, model, seed, sched,
                  [{"name": "none"}], {}, "teacher", results, la, dry_run, verbose)


@train_app.command("student")
@_with_launch
def train_student(dataset: str = typer.Option("digits", "--dataset", "-d", help="Dataset spec (as for train teacher)."),
                  model: str = typer.Option(..., "--model", "-m", help="Student model spec, e.g. mlp:32, resnet20, timm:resnet18."),
                  teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="The (weak) teacher: a model.pt, a run folder, a study folder with one teacher, or timm:/tv: pretrained."),
                  strong: Optional[str] = typer.Option(None, "--strong", help="A second, stronger teacher (replace, ckm)."),
                  distiller: List[str] = typer.Option(["kd"], "--distiller", "-D", help="Repeat to train a group on one data stream: none, kd, wsl, ckm, rkd, replace:scheme=full,subset=reg_cor, manipulate:kind=teacher_amp,delta=0.2,subset=reg."),
                  name: Optional[str] = typer.Option(None, "--name", help="Folder under the results root (default students-<dataset>)."),
                  data_root: Optional[str] = DATA_ROOT, image_size: Optional[int] = IMAGE_SIZE, augment: bool = AUGMENT,
                  seed: int = SEED,
                  epochs: int = SCHED_OPTS["epochs"], lr: float = SCHED_OPTS["lr"],
                  weight_decay: float = SCHED_OPTS["weight_decay"], warmup_epochs: float = SCHED_OPTS["warmup_epochs"],
                  batch_size: int = SCHED_OPTS["batch_size"], results: str = RESULTS,
                  dry_run: bool = DRY_RUN_JOBS, verbose: bool = VERBOSE, la: LaunchArgs = None):
    """Train one student, or a group of students (one per --distiller) that share every batch."""
    from .studies import resolve_teacher

    teachers = {}
    if teacher:
        teachers["weak"] = resolve_teacher(teacher)
    if strong:
        teachers["strong"] = resolve_teacher(strong, "--strong")
    sched = {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "batch_size": batch_size}
    _train_single(name or f"students-{dataset.split(':')[0]}", dataset, data_root, image_size, augment, model, seed, sched,
                  [_parse_distiller(d) for d in distiller], teachers, "student", results, la, dry_run, verbose)


# -- probes -----------------------------------------------------------------------------------

@attack_app.command("fgsm")
@_with_launch
def attack_fgsm(study: Path = typer.Option(..., "--study", "-s", help="A study whose distilled runs to probe (figure7-*, table1-*)."),
                sets: Optional[List[str]] = SETS, results: str = RESULTS,
                n: Optional[int] = typer.Option(None, "--n", help="Samples drawn at random (seeded) from each of kept and manipulated (default: the study's probe.n, else 1000)."),
                eps: Optional[List[float]] = typer.Option(None, "--eps", help="FGSM step(s) in pixel units [0,1]; repeat. Default: the study's probe.eps, else 0.5/255 .. 8/255."),
                dry_run: bool = typer.Option(False, "--dry-run", help="Print the job(s); train nothing."),
                verbose: bool = VERBOSE, la: LaunchArgs = None):
    """Fig. 7: FGSM on kept vs manipulated samples; saves the per-sample confidence change table.

    Trains whatever the study still needs first (skipping finished runs)."""
    from .studies import DEFAULT_EPS, add_probes

    if n is not None and n < 1:
        raise EffdstlError(f"--n must be >= 1, got {n}")
    if eps and not all(0 < e <= 1 for e in eps):  # written so that NaN fails too
        raise EffdstlError(f"--eps values must be in (0, 1] (pixel units), got {eps}")
    plan = _load_plan(study, sets, results)
    pcfg = plan.study.get("probe") or {}
    n = n if n is not None else int(pcfg.get("n", 1000))
    eps = list(eps or pcfg.get("eps") or DEFAULT_EPS)
    targets = add_probes(plan, n, eps, forget_stale=not dry_run)
    _run_plan(plan, la, dry_run, verbose)
    if not dry_run:
        from .files import read_json

        for tgt in targets:
            info = Path(tgt["out"]).with_suffix(".json")
            if info.exists():
                j = read_json(info)
                out.print(", ".join(f"{k}: {j['drawn'][k]} drawn of {j['existed'][k]}" for k in j["existed"])
                          + f" ({j['manipulated_means']}; seed {j['seed']})", highlight=False)
            out.print(f"FGSM table: {tgt['out']}")
        from . import plots

        for p in plots.figure7(plan.study_dir):
            out.print(f"wrote {p}")


# -- status, results, figures, tables ------------------------------------------------------

def _study_dir(study: str, results: str) -> Path:
    """A study by name (results/<name>), by folder, or by its YAML file."""
    from .studies import study_dir

    p = Path(study)
    if p.suffix in (".yaml", ".yml"):
        from .config import load_study

        return study_dir(results, load_study(p)["name"])
    if p.is_dir() and (p / "runs").is_dir():
        return p
    d = study_dir(results, study)
    if not d.is_dir():
        have = sorted(x.name for x in Path(results).glob("*/") if (x / "runs").is_dir()) if Path(results).is_dir() else []
        from .errors import unknown

        raise unknown(f"study (no folder {d})", study, have) if have else EffdstlError(f"no study folder {d}")
    return d


def _declared_study_kind(study: str, results: str) -> str | None:
    """The kind a study says it is: its YAML file, its results folder's study.yaml, or
    studies/<name>.yaml; None when none of them can be read."""
    p = Path(study)
    cands = [p] if p.suffix in (".yaml", ".yml") else [p / "study.yaml", Path(results) / study / "study.yaml",
                                                       Path("studies") / f"{study}.yaml"]
    from .config import STUDY_MAX_BYTES, read_small_file

    for c in cands:
        if not os.path.lexists(c):
            continue
        try:  # a FIFO or /dev/zero named as a study: one line, never a read that does not end
            kind = (yaml.safe_load(read_small_file(c, "study file", STUDY_MAX_BYTES).decode("utf-8")) or {}).get("kind")
        except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
            continue
        if isinstance(kind, str):
            return kind
    return None


@app.command("status")
def status(study: str = typer.Argument(..., help="Study name, folder, or YAML file."), results: str = RESULTS):
    """A table of every run: state, epoch, accuracy, job id (a damaged run: what is wrong)."""
    from .rundir import RunDir

    d = _study_dir(study, results)
    t = Table(title=f"{d.name}")
    for col in ("run", "label", "model", "seed", "state", "epoch", "best top-1", "job"):
        t.add_column(col)
    counts: dict[str, int] = {}
    rows = []
    damaged = []
    for rd in (d / "runs").glob("*/"):
        if (rd / "config.yaml").exists():
            run = RunDir(rd)
            cfg = run.config
            rows.append((cfg.get("role") != "teacher", str(cfg.get("meta", {}).get("label", "")),
                         cfg.get("seed", 0), rd.name, run, cfg))
    for *_, run, cfg in sorted(rows, key=lambda r: r[:4]):
        st = run.state()
        counts[st] = counts.get(st, 0) + 1
        hist = run.metrics
        fin = run.final if st == "done" else {}
        if st == "damaged":
            damaged.append(f"{run.name}: {run.problem()}")
        best = fin.get("best_top1", max((h.get("test_top1", float("nan")) for h in hist), default=float("nan")))
        color = {"done": "green", "failed": "red", "damaged": "red", "running": "yellow"}.get(st, "white")
        t.add_row(run.name, _text(cfg.get("meta", {}).get("label", "")), _text(cfg.get("model", "?")),
                  _text(cfg.get("seed", "?")), f"[{color}]{st}[/]", f"{len(hist)}/{cfg.get('epochs', '?')}", f"{best:.2f}",
                  _text(run.job.get("job_id", "")))
    out.print(t)
    out.print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no runs yet")
    for line in damaged:
        out.print(f"damaged {line}; retrain it with --rerun {line.split(':')[0]} (or delete its folder)",
                  highlight=False, markup=False, soft_wrap=True)


@app.command("results")
def results_cmd(study: str = typer.Argument(..., help="Study name, folder, or YAML file."), results: str = RESULTS,
                fmt: str = typer.Option("table", "--format", help="table (print) | csv | parquet (write; print the path)"),
                anchor: Optional[str] = typer.Option(None, "--anchor", help="The label every configuration is "
                                                     "compared to, seed by seed (default: the study kind's "
                                                     "reference, e.g. 'weak teacher only', 'no distill').")):
    """Collect every run into one table, and each configuration's paired difference to its anchor with a 95 % interval (CSV + Parquet under <study>/tables/: results.*, effects.*)."""
    from .effects import ANCHOR, effect_text, paired_effects
    from .results import collect, write_table

    if fmt not in ("table", "csv", "parquet"):
        from .errors import unknown

        raise unknown("format", fmt, ("table", "csv", "parquet"))
    d = _study_dir(study, results)
    df = collect(d)
    paths = write_table(df, d / "tables")
    eff = None
    if (df["state"] == "done").any() and (anchor or (df["study_kind"].isin(list(ANCHOR))).any()):
        eff = paired_effects(df, anchor)
        paths = [*paths, *write_table(eff, d / "tables", "effects")]
    if fmt == "table":
        cols = [c for c in ("label", "student", "seed", "state", "last_top1", "best_top1", "epochs", "wall_s") if c in df]
        view = df[cols].sort_values([c for c in ("label", "seed") if c in cols])
        view = view.rename(columns={"best_top1": "best_top1 (chosen on test)"})
        out.print(view.to_string(index=False, float_format=lambda v: f"{v:.2f}"), markup=False, highlight=False)
        if eff is not None and not eff.empty:
            out.print(f"\npaired differences to '{eff['anchor'].iloc[0]}' (same seed; {eff['metric'].iloc[0]}, "
                      f"points; 95 % interval over seeds):", markup=False, highlight=False)
            show = eff.assign(effect=[effect_text(r) for _, r in eff.iterrows()])
            cols = [c for c in ("triplet", "pair", "setting", "student") if c in show and show[c].nunique() > 1]
            out.print(show[[*cols, "label", "acc", "acc_anchor", "effect", "verdict"]].to_string(
                index=False, float_format=lambda v: f"{v:.2f}"), markup=False, highlight=False)
    for p in (paths if isinstance(paths, (list, tuple)) else [paths]):
        if fmt == "table" or str(p).endswith(fmt):
            out.print(f"wrote {p}")


# The study kinds each figure draws (Fig. 7: the FGSM probes of a figure7 study or of any recipe study).
FIGURE_KINDS = {"figure5": ("replacement",), "figure6": ("manipulation",),
                "figure7": ("fgsm", "recipe", "ablation", "fig8"), "figure8": ("fig8",)}
KIND_FIGURE = {"replacement": "figure5", "manipulation": "figure6", "fgsm": "figure7", "fig8": "figure8"}


@app.command("plot")
def plot(figure: str = typer.Argument(..., help="figure5 | figure6 | figure7 | figure8 | curves"),
         study: str = typer.Argument(..., help="Study name, folder, or YAML file."), results: str = RESULTS,
         runs: Optional[List[str]] = typer.Option(None, "--runs", help="curves: the run labels to draw (repeat; "
                                                  "default: every label of the study).")):
    """Draw one of the paper's figures, or training curves (PNG + PDF under <study>/figures/)."""
    from . import plots

    names = (*(f"figure{k}" for k in plots.FIGURES), "curves")
    if figure not in names:
        from .errors import unknown

        raise unknown("figure", figure, names)
    if figure in FIGURE_KINDS:  # refuse the wrong kind of study before reading its runs
        declared = _declared_study_kind(study, results)
        if declared and declared not in FIGURE_KINDS[figure]:
            raise EffdstlError(f"{figure} draws {' or '.join(FIGURE_KINDS[figure])} studies; study {study} is of "
                               f"kind '{declared}'" + (f" (draw it with `effdstl plot {KIND_FIGURE[declared]}`)"
                                                       if declared in KIND_FIGURE else ""))
    d = _study_dir(study, results)
    paths = plots.curves(d, runs) if figure == "curves" else plots.FIGURES[figure.removeprefix("figure")](d)
    for p in (paths if isinstance(paths, (list, tuple)) else [paths]):
        out.print(f"wrote {p}")


@app.command("table")
def table(which: str = typer.Argument(..., help="table1 | table3 | table4 (tables.TABLES)"),
          study: str = typer.Argument(..., help="Study name, folder, or YAML file."), results: str = RESULTS):
    """Write one of the paper's tables (Markdown, CSV, LaTeX) with the paper's numbers beside ours."""
    from . import tables

    names = tuple(f"table{k}" for k in tables.TABLES)
    if which not in names:
        from .errors import unknown

        raise unknown("table", which, names)
    declared = _declared_study_kind(study, results)  # refuse the wrong kind of study before reading runs
    if declared:
        tables.require_study_kind(Path(study), which, {declared})
    res = tables.TABLES[which.removeprefix("table")](_study_dir(study, results))
    df, paths = res if isinstance(res, tuple) else (res, [])
    md = next((p for p in paths if str(p).endswith(".md")), None)
    out.print(Path(md).read_text() if md else df.to_string(index=False), markup=False, highlight=False)
    for p in paths:
        out.print(f"wrote {p}")


@app.command("demo")
def demo(results: str = RESULTS, executor: str = typer.Option("debug", "--executor", "-x",
                                                             help="debug (in this process, fastest) | local | slurm."),
         sets: Optional[List[str]] = SETS):
    """The offline demo: the Fig. 5 replacement study on digits, its table and figure (CPU, minutes)."""
    from . import plots
    from .results import collect, write_table

    from .launch import LaunchOptions

    la = LaunchArgs(LaunchOptions(executor=executor, timeout_min=60, workers=0))
    study = Path(__file__).resolve().parent.parent / "studies" / "figure5-digits.yaml"
    if not study.exists():
        study = Path("studies/figure5-digits.yaml")
    plan = _load_plan(study, sets, results, ("replacement",))
    _run_plan(plan, la, False)
    df = collect(plan.study_dir)
    paths = list(write_table(df, plan.study_dir / "tables")) + list(plots.figure5(plan.study_dir))
    for p in paths:
        out.print(f"wrote {p}")


@app.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def bench(device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
          args: Optional[List[str]] = typer.Argument(None, hidden=True)):
    """Measure the engine against a naive loop, groups against separate runs, and the data pipeline.

    Bench options (model pair, --image-size, --batch, --compile, --only a,b,c,d, --json ...) follow;
    `effdstl bench -h` lists them.
    """
    from .bench import main as bench_main

    bench_main(device=device, argv=args or [])


class Interrupted(EffdstlError):
    """The command was interrupted (Ctrl-C: exit 130; SIGTERM: 143); printed as ``interrupted: ...``."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class _Terminated(KeyboardInterrupt):
    signum = 15


def _on_sigterm(signum, frame):
    raise _Terminated()


# The click exceptions Typer raises (its own vendored copy of click in recent versions, click itself before)
_CLICK = sys.modules[typer.BadParameter.__module__]
if not hasattr(_CLICK, "NoArgsIsHelpError"):  # older click: no such class, so nothing to catch
    _CLICK.NoArgsIsHelpError = type("NoArgsIsHelpError", (Exception,), {})


def main() -> None:
    import signal

    # `kill PID` stops the command as Ctrl-C does: local jobs are cancelled, locks given back.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = app(standalone_mode=False)  # usage errors come here, not to Typer's boxed panel
        if isinstance(code, int) and code:  # typer.Exit(n), e.g. 130 for a Ctrl-C Typer caught
            sys.exit(code)
    except _CLICK.NoArgsIsHelpError as exc:  # `effdstl train`: the help, as before
        exc.show()
        sys.exit(exc.exit_code)
    except _CLICK.ClickException as exc:  # a usage error: the project's one line, and where to read more
        msg = " ".join(exc.format_message().split())
        ctx = getattr(exc, "ctx", None)
        names = []  # the subcommands' names: the program is `effdstl` however it was started (python -m, a test)
        while ctx is not None and ctx.parent is not None:
            names.append(ctx.info_name)
            ctx = ctx.parent
        hint = f" (see `{' '.join(['effdstl', *reversed(names)])} --help`)" if getattr(exc, "ctx", None) is not None else ""
        console.print(f"error: {msg}{hint}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        console.print("interrupted", highlight=False, markup=False)
        sys.exit(130)
    except Interrupted as exc:
        console.print(f"interrupted: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except EffdstlError as exc:
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # disk full, no permission, a path under a file: the environment, not a bug
        from rich.markup import escape

        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        console.print(f"[bold red]error:[/] {escape(str(exc.strerror or exc) + where)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted: finished epochs are saved; run the same command again to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
