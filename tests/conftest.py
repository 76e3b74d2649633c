"""Shared test helpers: tiny study files, the real CLI as a subprocess, the local Slurm cluster.

* ``write_study(path, **over)`` / the ``tiny_study`` fixture: a small Fig. 5-like replacement
  study on ``synthetic`` (two 1-epoch MLP teachers, one 2-epoch group per seed): each job trains
  in about a second, so a whole sweep is bounded by process start-up (importing torch).
* ``run_cli(*args, cwd=...)``: ``effdstl ...`` in a subprocess, offline, one thread, with a timeout;
  ``run_cli_inproc(*args, cwd=...)``: the same in this process (no torch start-up), for commands
  that fail before any job.
* ``slurm_cluster``: a session fixture that skips (with the reason) when the local Slurm cluster
  of ``scripts/local-slurm.sh`` does not answer; tests that need it are marked ``slurm``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# A test run started in the background by a shell without job control (`make test &` in a script,
# some CI runners) inherits SIGINT ignored, and exec keeps it ignored in every process it starts:
# the CLI then cannot be interrupted, Python never turns a SIGINT into KeyboardInterrupt, and the
# Ctrl-C tests fail for a reason that is not the code's. The tests need the disposition a terminal
# gives (a handler, not "ignored", is reset to the default by exec in each child).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
SLURM_SCRIPT = ROOT / "scripts" / "local-slurm.sh"


def real_data_dir() -> Path:
    """Where real test data (cifar10-jpeg.npz, unpack-cifar10) lives: $EFFDSTL_TEST_DATA, else the
    repository's ignored data/ folder, else the shared data folder a workspace may keep beside the
    checkout; tests that need it skip, with the reason, when none has it."""
    env = os.environ.get("EFFDSTL_TEST_DATA")
    if env:
        return Path(env)
    for d in (ROOT / "data", ROOT.parent / "shared" / "data"):
        if (d / "cifar10-jpeg.npz").exists():
            return d
    return ROOT / "data"


def effdstl_cmd() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m effdstl_cli.cli``."""
    exe = Path(sys.executable).parent / "effdstl"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "effdstl_cli.cli"]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(EFFDSTL_OFFLINE="1", EFFDSTL_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="200",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run ``effdstl ARGS``; on ``check`` a non-zero exit fails the test with the output shown."""
    cmd = effdstl_cmd() + [str(a) for a in args]
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`effdstl {' '.join(map(str, args))}` ran past {timeout} s\n"
                    f"stdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")
    if check and p.returncode != 0:
        pytest.fail(f"`effdstl {' '.join(map(str, args))}` exited {p.returncode}\n"
                    f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def run_cli_inproc(*args: str, cwd: Path, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """``effdstl ARGS`` in this process, through the console script's own ``main`` (its error
    handling, exit codes and output), without starting an interpreter and importing torch again:
    for commands that fail before any job. Same result as :func:`run_cli` (returncode, stdout,
    stderr; an escaping exception is a traceback on stderr and exit 1, as in a subprocess).
    ``env`` replaces the environment for the call, ``cwd`` is the working directory; both, and
    the SIGTERM handler ``main`` installs, are restored after. Not thread-safe: one call at a time."""
    import contextlib
    import io
    import signal
    import traceback

    from effdstl_cli import cli

    argv = ["effdstl", *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_term = signal.getsignal(signal.SIGTERM)
    code = 0
    try:
        os.environ.clear()
        os.environ.update(env or cli_env())
        os.chdir(cwd)
        sys.argv = argv
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - what a subprocess would print and exit with
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        signal.signal(signal.SIGTERM, saved_term)
    p = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        pytest.fail(f"`effdstl {' '.join(map(str, args))}` exited {code}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


# -- tiny studies --------------------------------------------------------------------------------

def study_dict(name: str = "tiny", *, dataset: str = "synthetic", seeds=(0,), epochs: int = 2,
               teacher_epochs: int = 1, batch_size: int = 64, student: str = "mlp:16",
               weak: str = "mlp:16", strong: str = "mlp:32", schemes=("full",), subsets=("reg_cor",),
               **over) -> dict:
    """A Fig. 5-like replacement study: 2 teachers -> one group per seed of 2 baselines + the grid."""
    s = {
        "name": name, "kind": "replacement", "dataset": dataset, "seeds": list(seeds), "batch_size": batch_size,
        "teachers": {"weak": {"model": weak, "epochs": teacher_epochs},
                     "strong": {"model": strong, "epochs": teacher_epochs}},
        "teacher_schedule": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "seed": 0},
        "triplets": [{"weak": "weak", "strong": "strong", "student": student}],
        "schedule": {"epochs": epochs, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "min_lr": 0.0},
        "distill": {"tau": 1.0, "lam": 1.0},
        "grid": {"scheme": list(schemes), "subset": list(subsets)},
    }
    s.update(over)
    return s


def write_study(path: Path, **kw) -> Path:
    """Write ``study_dict(**kw)`` as YAML to ``path`` (a file, or a folder: <name>.yaml in it)."""
    path = Path(path)
    s = study_dict(**kw)
    if path.is_dir():
        path = path / f"{s['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(s, sort_keys=False))
    return path


@pytest.fixture
def tiny_study(tmp_path):
    """``tiny_study(**over) -> Path`` of a small study YAML under tmp_path (see ``study_dict``)."""

    def make(**kw) -> Path:
        return write_study(tmp_path / f"{kw.get('name', 'tiny')}.yaml", **kw)

    return make


# -- run directories -------------------------------------------------------------------------------

def run_dirs(study_dir: Path) -> list[Path]:
    return sorted(p for p in (Path(study_dir) / "runs").glob("*/") if (p / "config.yaml").exists())


def metrics_epochs(run_dir: Path) -> list[int]:
    from effdstl_cli.files import read_jsonl

    return [int(r["epoch"]) for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def job_ids(study_dir: Path) -> dict[str, str]:
    """{run hash: job id} from every run's job.json."""
    out = {}
    for rd in run_dirs(study_dir):
        if (rd / "job.json").exists():
            out[rd.name] = str(json.loads((rd / "job.json").read_text())["job_id"])
    return out


# -- the local Slurm cluster ---------------------------------------------------------------------

def _slurm_status() -> str | None:
    """None when the local cluster answers; else why not."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return "Slurm client tools (sbatch, sinfo) are not installed"
    if not SLURM_SCRIPT.exists():
        return f"{SLURM_SCRIPT} is missing"
    try:
        p = subprocess.run(["bash", str(SLURM_SCRIPT), "status"], capture_output=True, text=True, timeout=40)
    except subprocess.TimeoutExpired:
        return "`scripts/local-slurm.sh status` did not answer within 40 s"
    if p.returncode != 0:
        return "local Slurm cluster is not up (`scripts/local-slurm.sh status` exit %d: %s)" % (
            p.returncode, " | ".join(p.stdout.strip().splitlines()[-2:]))
    try:
        q = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    if q.returncode != 0:
        return f"sinfo failed: {q.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """Skip unless the local Slurm cluster answers (start it: bash scripts/local-slurm.sh start)."""
    why = _slurm_status()
    if why:
        pytest.skip(f"{why}; start it with `bash scripts/local-slurm.sh start` (make test does)")
    return True


# -- parallel runs (pytest-xdist; `make test` passes -n and --dist loadgroup) ----------------------

# Test files whose tests must stay on one xdist worker, in order: a module fixture that trains or
# runs every case at once would otherwise be paid once per worker (test_bad_inputs' ``outcomes``
# runs every selected case), and the local Slurm cluster takes one test's jobs at a time. Every
# other test goes to whichever worker is free.
SERIAL_FILES = ("test_bad_inputs.py", "test_crash.py", "test_findings.py", "test_slurm.py", "test_planning.py")


@pytest.hookimpl(optionalhook=True)  # a venv without pytest-xdist still runs the suite (one process)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` with the groups above. (xdist's own grouping by ``xdist_group`` marks
    renames the tests' node ids, which pytest 9 no longer lets it do: it silently does not group.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SerialFiles(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return file if Path(file).name in SERIAL_FILES else nodeid

    return SerialFiles(config, log)
