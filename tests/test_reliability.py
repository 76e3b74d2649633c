"""Issue 14, "Reliability, round two", through the real CLI in subprocesses (real files, real jobs).

* every file a later run trusts is checksummed when written and verified when read: a damaged
  final.json, metrics.jsonl, model.pt, subset.pt or config.yaml makes its run ``damaged`` in
  ``status``, ``results`` and ``run`` alike; nothing is trained from it, the table never shows its
  numbers, and ``--rerun RUN`` is the cure; run folders written before checksums still load;
* written files get the mode the umask gives (0644 at umask 022), not 0600;
* a failed (NaN) teacher is named by its students' job, not reported as "missing";
* a half-written lock is waited for, then taken over; a live holder is named;
* two identical sweeps started together on the local executor both succeed, every run trained once;
* Ctrl-C / ``kill`` of the CLI with the local executor stops the training job (no orphan);
* ``--skip-bad-images`` leaves undecodable images out and counts them in final.json.

The one-line messages of the bad inputs (nested keys, option domains, npz labels, corrupt JPEGs)
live in the catalogue, tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import cli_env, metrics_epochs, run_dirs, write_study

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "effdstl_cli.cli"]


def cli(args: list, cwd: Path, timeout: float = 300, umask: int | None = None, **env) -> subprocess.CompletedProcess:
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(CLI + [str(a) for a in args], cwd=cwd, env=cli_env(**env), capture_output=True,
                          text=True, timeout=timeout, preexec_fn=pre)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout:\n{p.stdout}\n--- stderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr + p.stdout
    return p


def one_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1, p.stderr
    return errs[0]


def flip(path: Path, n: int = 64) -> None:
    b = bytearray(path.read_bytes())
    mid = len(b) // 2
    b[mid:mid + n] = bytes(x ^ 0xFF for x in b[mid:mid + n])
    path.write_bytes(bytes(b))


def by_label(study_dir: Path) -> dict[str, Path]:
    return {yaml.safe_load((d / "config.yaml").read_text())["meta"]["label"]: d for d in run_dirs(study_dir)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny study (2 teachers, a group of 3 students), trained once with the real CLI."""
    base = tmp_path_factory.mktemp("finished")
    f = write_study(base / "tiny.yaml")
    ok(cli(["run", "-s", f, "--results", base / "results", "-x", "debug"], base))
    assert len(run_dirs(base / "results" / "tiny")) == 5
    return base


def _copy(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(finished / "results", tmp_path / "results")
    shutil.copy(finished / "tiny.yaml", tmp_path / "tiny.yaml")
    return tmp_path / "results", tmp_path / "tiny.yaml"


# -- item 1 + 2: checksums, one verdict, --rerun ------------------------------------------------

def test_damaged_files_are_never_used_and_rerun_cures_them(finished, tmp_path):
    res, f = _copy(finished, tmp_path)
    sd = res / "tiny"
    runs = by_label(sd)
    damage = {  # one run per kind of file a finished run leaves
        "teacher weak": ("model.pt", lambda d: flip(d / "model.pt")),
        "teacher strong": ("metrics.jsonl", lambda d: (d / "metrics.jsonl").unlink()),
        "weak teacher only": ("final.json", lambda d: (d / "final.json").write_bytes((d / "final.json").read_bytes()[:50])),
        "full / reg_cor": ("subset.pt", lambda d: flip(d / "subset.pt", 8)),
        "strong teacher only": ("config.yaml", lambda d: (d / "config.yaml").write_text(
            (d / "config.yaml").read_text().replace("seed: 0", "seed: 1", 1))),
    }
    assert set(damage) == set(runs), runs.keys()
    assert (runs["full / reg_cor"] / "subset.pt").exists()
    for label, (_, hurt) in damage.items():
        hurt(runs[label])
    finals_before = {d.name for d in run_dirs(sd) if (d / "final.json").exists()}

    st = ok(cli(["status", "tiny", "--results", res], tmp_path))          # one verdict: damaged, never a traceback
    assert "5 damaged" in st.stdout, st.stdout
    for label, (name, _) in damage.items():
        line = next(ln for ln in st.stdout.splitlines() if ln.startswith(f"damaged {runs[label].name}"))
        assert name in line and f"--rerun {runs[label].name}" in line, line

    ok(cli(["results", "tiny", "--results", res, "--format", "csv"], tmp_path))
    df = pd.read_csv(sd / "tables" / "results.csv").set_index("run")
    assert set(df["state"]) == {"damaged"} and df["best_top1"].isna().all()  # never a damaged run's numbers

    widened = ["run", "-s", f, "--results", res, "-x", "debug", "--set", "grid.subset=[reg_cor,all]"]
    err = one_error(cli(widened, tmp_path))                               # nothing trains from a damaged run
    assert "is damaged" in err and "--rerun" in err, err
    assert {d.name for d in run_dirs(sd) if (d / "final.json").exists()} == finals_before
    assert len(run_dirs(sd)) == 5                                          # not one new run started

    ok(cli(widened + sum((["--rerun", d.name] for d in runs.values()), []), tmp_path))  # the cure
    st = ok(cli(["status", "tiny", "--results", res], tmp_path))
    assert "6 done" in st.stdout and "damaged" not in st.stdout, st.stdout
    ok(cli(["results", "tiny", "--results", res, "--format", "csv"], tmp_path))
    df = pd.read_csv(sd / "tables" / "results.csv")
    assert len(df) == 6 and set(df["state"]) == {"done"} and df["run"].is_unique
    for d in run_dirs(sd):
        fin = json.loads((d / "final.json").read_text())
        assert {"model.pt", "metrics.jsonl", "config.yaml"} <= set(fin["files"]) and "checksum" in fin


def test_damaged_teacher_model_is_refused_where_it_is_loaded(finished, tmp_path):
    """Past the launcher too: a job handed a damaged teacher stops with the file and the cure."""
    from effdstl_cli.engine import Env, train_group

    res, _ = _copy(finished, tmp_path)
    runs = by_label(res / "tiny")
    flip(runs["teacher weak"] / "model.pt")
    d = runs["full / reg_cor"]
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["seed"] = 7                                                          # a new run of the same teachers
    for t in cfg["teachers"].values():                                       # ... in this copy of the results
        t["ckpt"] = str(res / "tiny" / "runs" / t["run"] / "model.pt")
    from effdstl_cli.errors import EffdstlError

    with pytest.raises(EffdstlError, match=r"model.pt does not match its checksum.*--rerun"):
        train_group([(cfg, res / "tiny" / "runs" / "new")], Env(device="cpu", log=lambda m: None))
    assert not (res / "tiny" / "runs" / "new" / "final.json").exists()


def test_runs_written_before_checksums_still_load(finished, tmp_path):
    res, f = _copy(finished, tmp_path)
    for d in run_dirs(res / "tiny"):
        fin = json.loads((d / "final.json").read_text())
        (d / "final.json").write_text(json.dumps({k: v for k, v in fin.items() if k not in ("files", "checksum")}))
    st = ok(cli(["status", "tiny", "--results", res], tmp_path))
    assert "5 done" in st.stdout
    p = ok(cli(["run", "-s", f, "--results", res, "-x", "debug"], tmp_path))
    assert "nothing to do" in p.stdout + p.stderr


def test_teacher_cache_file_is_verified(tmp_path):
    import torch

    from effdstl_cli.cache import TeacherCache

    path = tmp_path / "teacher-k.pt"
    c = TeacherCache("k", 8, 1, "cpu", path=path)
    c.put(torch.arange(8), torch.zeros(8, dtype=torch.long), torch.randn(8, 3))
    c.save()
    assert TeacherCache("k", 8, 1, "cpu", path=path).count == 8               # intact: served
    flip(path, 16)
    again = TeacherCache("k", 8, 1, "cpu", path=path)
    assert again.count == 0 and "damaged" in again.note                       # damaged: said, never served


# -- item 3: the umask's mode -----------------------------------------------------------------------

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_get_the_umask_mode(tmp_path, umask, mode):
    f = write_study(tmp_path / "m.yaml", name="m", teacher_epochs=1, epochs=1)
    ok(cli(["run", "-s", f, "--results", tmp_path / "r", "-x", "debug"], tmp_path, umask=umask))
    ok(cli(["results", "m", "--results", tmp_path / "r", "--format", "csv"], tmp_path, umask=umask))
    files = [p for p in (tmp_path / "r" / "m").rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.pt", "final.json", "metrics.jsonl", "ckpt-last.pt", "config.yaml", "study.yaml", "results.csv"} <= names
    wrong = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != mode}
    assert not wrong, wrong


# -- item 8: a NaN teacher is named downstream ------------------------------------------------------

def test_nan_teacher_is_named_by_its_students(tmp_path):
    f = write_study(tmp_path / "nt.yaml", name="nt", teachers={"weak": {"model": "mlp:16", "epochs": 1, "lr": 1.0e30},
                                                               "strong": {"model": "mlp:32", "epochs": 1}})
    err = one_error(cli(["run", "-s", f, "--results", tmp_path / "r", "-x", "debug"], tmp_path))
    assert "teacher 'weak'" in err and "failed: non-finite loss" in err, err
    assert "does not exist" not in err and "train the teacher first" not in err, err


# -- item 9: locks ------------------------------------------------------------------------------------

def test_half_written_lock_is_waited_for_then_taken_over(tmp_path):
    from effdstl_cli.files import LockBusy, RunLock

    (tmp_path / "lock").write_text('{"pid": 12')                  # caught between creation and write
    t0 = time.time()
    lock = RunLock(tmp_path).acquire()                             # was: AttributeError on None
    assert 4.0 <= time.time() - t0 < 15 and lock.held
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    lock.release()
    holder = subprocess.Popen(["sleep", "30"])
    try:
        from effdstl_cli.files import boot_id, proc_start

        # a lock as a live holder writes it: its pid, this boot, and that process's start time
        (tmp_path / "lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": time.time(),
                                                   "boot_id": boot_id(), "pid_start": proc_start(holder.pid)}))
        with pytest.raises(LockBusy, match=f"being trained by pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_two_identical_sweeps_at_once_on_the_local_executor_both_succeed(tmp_path):
    study = ROOT / "studies" / "figure5-digits.yaml"
    sets = ["seeds=[0]", "teachers.weak.epochs=2", "teachers.strong.epochs=3", "schedule.epochs=2",
            "grid.scheme=[full]", "grid.subset=[reg_cor,all]"]
    cmd = CLI + ["sweep", "replacement", "-s", str(study), "--results", str(tmp_path / "r"), "-x", "local",
                 "--device", "cpu"] + [a for s in sets for a in ("--set", s)]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=500) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, f"exit {p.returncode}\n{o}\n{e}"
        assert "Traceback" not in o + e
    sd = tmp_path / "r" / "figure5-digits"
    runs = run_dirs(sd)
    assert len(runs) == 6                                          # 2 teachers + 2 baselines + 2 grid runs
    logs = "".join(p.read_text() for p in sd.glob("logs/*/*_log.out"))
    for d in runs:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert metrics_epochs(d) == list(range(1, cfg["epochs"] + 1)), d   # each epoch once
        assert json.loads((d / "final.json").read_text())["status"] == "done"
        assert not (d / "lock").exists()
        assert f"run {d.name}: resumed" not in logs                # trained in one go, by one process
        jid = json.loads((d / "job.json").read_text())["job_id"]   # the job that really trained it
        assert (sd / "logs" / jid).is_dir(), jid
    assert not (sd / "logs" / "%j").exists()                       # submitit's folder template, made literally
    waited = sum(ln.count("waiting for it") for ln in logs.splitlines())
    assert waited >= 1, logs[-3000:]                               # the second sweep waited, not failed
    ok(cli(["results", "figure5-digits", "--results", tmp_path / "r", "--format", "csv"], tmp_path))
    df = pd.read_csv(sd / "tables" / "results.csv")
    assert len(df) == 6 and df["run"].is_unique and set(df["state"]) == {"done"}


# -- item 10: Ctrl-C and kill with the local executor ------------------------------------------------

def _alive(pid: int) -> bool:
    from effdstl_cli.files import _alive as alive

    return alive(pid)


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_interrupting_the_cli_stops_its_local_jobs(tmp_path, how):
    args = ["train", "teacher", "-d", "digits", "-m", "mlp:256-256", "--epochs", "60", "--batch-size", "8",
            "--name", "c", "--results", tmp_path / "r", "-x", "local", "--device", "cpu"]
    proc = subprocess.Popen(CLI + [str(a) for a in args], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    sd = tmp_path / "r" / "c"
    try:
        t0 = time.time()
        while proc.poll() is None and time.time() - t0 < 120:
            rds = run_dirs(sd) if sd.exists() else []
            if rds and (rds[0] / "lock").exists() and metrics_epochs(rds[0]):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        (rd,) = run_dirs(sd)
        trainer = json.loads((rd / "lock").read_text())["pid"]     # the training job's process
        assert trainer != proc.pid and _alive(trainer)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)                     # what a terminal sends: the whole group
        else:
            os.kill(proc.pid, signal.SIGTERM)                      # `kill <cli pid>`: the CLI alone
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == (130 if how == "ctrl-c" else 143), (proc.returncode, out, err)
    assert "Traceback" not in out + err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: stopped 1 local job(s)") and "run the same command again" in line, err
    t0 = time.time()
    while _alive(trainer) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert not _alive(trainer), "the training job outlived the command"
    assert not (rd / "lock").exists() or not _alive(json.loads((rd / "lock").read_text() or "{}").get("pid", -1))
    killed_job = json.loads((rd / "job.json").read_text())["job_id"]
    assert not (rd / "final.json").exists()
    if how == "kill":  # the same command again resumes and finishes; job.json names the job that did
        args[args.index("--epochs") + 1] = "60"
        p = ok(cli(args, tmp_path, timeout=400))
        jid = json.loads((rd / "job.json").read_text())["job_id"]
        assert jid != killed_job and f"as local job {jid}" in p.stdout + p.stderr
        assert metrics_epochs(rd) == list(range(1, 61))


# -- item 11: --skip-bad-images ----------------------------------------------------------------------

def test_skip_bad_images_leaves_them_out_and_counts_them(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    for bad in (root / "train" / "b" / "2.jpg", root / "val" / "a" / "1.jpg"):
        bad.write_bytes(bad.read_bytes()[:40])
    base = ["train", "teacher", "-d", f"folder:{root}", "-m", "mlp:8", "--image-size", "16", "--epochs", "1",
            "--workers", "1", "--name", "s", "--results", tmp_path / "r", "-x", "debug"]
    err = one_error(cli(base, tmp_path))
    assert "val/a/1.jpg cannot be decoded" in err and not list((tmp_path / "r").rglob("metrics.jsonl"))
    ok(cli(base + ["--skip-bad-images"], tmp_path))
    (rd,) = run_dirs(tmp_path / "r" / "s")
    fin = json.loads((rd / "final.json").read_text())
    assert fin["bad_images_skipped"] == 2 and sorted(Path(p).name for p in fin["bad_images"]) == ["1.jpg", "2.jpg"]


# -- item 5: the schema accepts every shipped study ------------------------------------------------

def test_every_shipped_study_passes_the_schema():
    from effdstl_cli.config import SCHEMA, load_study

    files = sorted((ROOT / "studies").glob("*.yaml"))
    assert len(files) >= 10
    for f in files:
        load_study(f)
    for key in ("schedule.kind", "schedule.milestones", "schedule.gamma"):   # issue 11's keys: one place
        sec, k = key.split(".")
        assert k in SCHEMA[sec]


# -- issue 19 (input side): what the catalogue of tests/test_bad_inputs.py cannot show in one line ----

def _fake_done(run_dir: Path, cfg: dict) -> None:
    """A finished, sealed run folder written by the real writers (config.yaml, metrics, the seal)."""
    from effdstl_cli import files as fio
    from effdstl_cli.rundir import RunDir

    run_dir.mkdir(parents=True)
    fio.write_yaml(run_dir / "config.yaml", cfg)
    fio.write_jsonl(run_dir / "metrics.jsonl", [{"epoch": e, "test_top1": 50.0} for e in range(cfg["epochs"])])
    RunDir(run_dir).write_final({"epochs": cfg["epochs"], "best_top1": 50.0})


def test_progress_counts_runs_finished_earlier_from_the_first_frame(tmp_path, monkeypatch):
    """2 of 5 runs finished before: the bars' first frame says 2/5 (was 0/5 until the first poll)."""
    import io

    from rich.console import Console

    from effdstl_cli import cli as cli_mod
    from effdstl_cli.config import load_study
    from effdstl_cli.studies import plan

    p = plan(load_study(write_study(tmp_path / "pg.yaml", name="pg")), tmp_path / "r")
    runs = [(c, d) for j in p.jobs for c, d in j.runs]
    assert len(runs) == 5
    for c, d in runs[:2]:
        _fake_done(d, c)
    frames = io.StringIO()
    monkeypatch.setattr(cli_mod, "console", Console(file=frames, force_terminal=True, width=120))
    seen = {}

    def launch(plan_, opts, report, on_poll):  # the first frame is drawn when the bars start
        seen["first"] = frames.getvalue()
        return {}

    monkeypatch.setattr("effdstl_cli.launch.launch", launch)
    monkeypatch.setattr("effdstl_cli.launch.refuse_damaged", lambda plan_: None)
    monkeypatch.setattr("effdstl_cli.studies.preflight_models", lambda plan_: None)
    from effdstl_cli.launch import LaunchOptions

    cli_mod._run_plan(p, cli_mod.LaunchArgs(LaunchOptions(executor="debug")), dry_run=False)
    assert "2/5" in seen["first"] and "0/5" not in seen["first"], seen["first"]


def test_inproc_runner_matches_the_console_script(tmp_path):
    """conftest.run_cli_inproc (the fast catalogue) gives what the console script gives: exit code,
    the one error line, nothing on stdout."""
    from conftest import effdstl_cmd, run_cli_inproc

    f = write_study(tmp_path / "ip.yaml", name="ip", seeds=[2 ** 70])
    args = ["run", "-s", f, "--results", tmp_path / "r", "-x", "debug"]
    sub = subprocess.run(effdstl_cmd() + [str(a) for a in args], cwd=tmp_path, env=cli_env(), capture_output=True,
                         text=True, timeout=300)
    inp = run_cli_inproc(*args, cwd=tmp_path)
    assert (sub.returncode, sub.stdout, sub.stderr) == (inp.returncode, inp.stdout, inp.stderr)
    assert inp.returncode == 2 and inp.stderr.startswith("error:") and "2**32" in inp.stderr
    assert os.getcwd() != str(tmp_path)  # restored


def test_preflight_refuses_in_seconds_and_dry_run_stays_torch_free(tmp_path):
    """The preflight builds every model once on one batch (an npz of 1x1 images into cnn:small:
    refused before any teacher trains, nothing written); the dry run does not import torch for it."""
    from conftest import run_cli_inproc

    rng = np.random.default_rng(0)
    y = (np.arange(40) % 2).astype(np.int64)
    npz = tmp_path / "one.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (40, 1, 1, 3), dtype=np.uint8), y_train=y,
             x_test=rng.integers(0, 256, (20, 1, 1, 3), dtype=np.uint8), y_test=y[:20])
    f = write_study(tmp_path / "pf.yaml", name="pf", dataset=f"npz:{npz}", weak="cnn:small", strong="cnn:medium",
                    student="mlp:8")
    t0 = time.time()
    p = run_cli_inproc("run", "-s", f, "--results", tmp_path / "r", "-x", "debug", cwd=tmp_path)
    assert p.returncode == 2 and "cannot run" in p.stderr and "3x1x1 images" in p.stderr, p.stderr
    assert time.time() - t0 < 60 and not (tmp_path / "r").exists()
    d = run_cli_inproc("run", "-s", f, "--results", tmp_path / "r", "--dry-run", cwd=tmp_path)
    assert d.returncode == 0 and d.stdout.strip().splitlines()[-1].startswith(   # says what it did not check
        "not checked by a dry run: each model on the data's shape"), d.stdout
    src = (ROOT / "effdstl_cli" / "studies.py").read_text()
    top = src[:src.index("\ndef ")]
    assert "import torch" not in top  # torch only inside preflight_models


def test_rerun_of_a_symlinked_run_keeps_its_files(tmp_path):
    """`--rerun` on a run folder that is a symbolic link is refused, and the files stay (they were
    reported gone, then reused)."""
    from effdstl_cli.errors import EffdstlError
    from effdstl_cli.rundir import RunDir

    target = tmp_path / "real" / "0123456789ab"
    target.mkdir(parents=True)
    (target / "metrics.jsonl").write_text('{"epoch": 0}\n')
    link = tmp_path / "runs" / "0123456789ab"
    link.parent.mkdir()
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(EffdstlError, match="is a symbolic link"):
        RunDir(link).clear()
    assert (target / "metrics.jsonl").exists() and link.is_symlink()


def test_edited_config_of_an_unfinished_run_is_damaged_not_resumed(tmp_path):
    """An unfinished run whose config.yaml no longer hashes to its folder's name is damaged (status,
    run), so it is never resumed and sealed with values it was not named for."""
    from effdstl_cli import files as fio
    from effdstl_cli.config import load_study
    from effdstl_cli.rundir import RunDir
    from effdstl_cli.studies import plan

    p = plan(load_study(write_study(tmp_path / "ed.yaml", name="ed")), tmp_path / "r")
    cfg, d = p.jobs[0].runs[0]
    d.mkdir(parents=True)
    fio.write_yaml(d / "config.yaml", cfg)
    fio.write_jsonl(d / "metrics.jsonl", [{"epoch": 0}])
    assert RunDir(d).state() == "partial"
    fio.write_yaml(d / "config.yaml", {**cfg, "epochs": cfg["epochs"] + 5})
    assert RunDir(d).state() == "damaged"
    assert "config.yaml is not the config the run is named after" in RunDir(d).problem()


def test_job_json_keeps_the_job_that_trains(tmp_path):
    """A second command that will only wait for a run does not put its job id in the run's job.json
    while the job named there is alive (`status`'s job column names the job that trained); a dead
    job's record is replaced."""
    from effdstl_cli.launch import _record
    from effdstl_cli.studies import Job

    d = tmp_path / "0123456789ab"
    d.mkdir()
    holder = subprocess.Popen(["sleep", "30"])
    try:
        (d / "job.json").write_text(json.dumps({"job_id": str(holder.pid), "executor": "local", "job": "g"}))
        _record(Job("g", "train", [({}, d)]), "99999999", "local")
        assert json.loads((d / "job.json").read_text())["job_id"] == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()
    _record(Job("g", "train", [({}, d)]), "424242", "local")
    assert json.loads((d / "job.json").read_text())["job_id"] == "424242"


def _as_nobody() -> list[str] | None:
    """A command prefix that runs as an unprivileged user (root ignores permission bits), or None."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return None
    pre = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    p = subprocess.run(pre + CLI + ["--help"], capture_output=True, text=True, env=cli_env(HOME="/tmp"),
                       cwd="/tmp", timeout=120)
    return pre if p.returncode == 0 else None


@pytest.mark.parametrize("where", ["study", "runs"])
def test_read_only_results_folder_one_line_for_an_unprivileged_user(request, where):
    """A results folder the user may not write (the study folder, or its runs/): one line naming the
    folder and the cause, exit 2, no traceback, no lock or temp file left; run as a real
    unprivileged user, since root ignores the permission bits (tests/test_bad_inputs.py has the
    non-root case)."""
    pre = _as_nobody()
    if pre is None:
        pytest.skip("needs root and setpriv to run the CLI as an unprivileged user (or the user cannot run it)")
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="effdstl-ro-", dir="/tmp"))  # pytest's tmp_path is root's, mode 700
    request.addfinalizer(lambda: shutil.rmtree(top, ignore_errors=True))
    os.chmod(top, 0o755)
    res = top / "res"
    (res / "x" / "runs").mkdir(parents=True)
    os.chmod(res, 0o777)
    if where == "runs":  # the study folder is writable, its runs/ is not
        os.chmod(res / "x", 0o777)
        (res / "x" / "logs").mkdir(mode=0o777)
        os.chmod(res / "x" / "logs", 0o777)
    p = subprocess.run(pre + CLI + ["train", "teacher", "-d", "synthetic", "-m", "mlp:8", "--epochs", "1",
                                    "--results", str(res), "--name", "x", "-x", "debug", "--device", "cpu"],
                       capture_output=True, text=True, env=cli_env(HOME="/tmp"), cwd="/tmp", timeout=300)
    line = one_error(p)
    want = {"study": f"results directory {res / 'x'} is not writable (Permission denied)",
            "runs": f"results directory {res / 'x' / 'runs'} is not writable (Permission denied)"}[where]
    assert want in line, line
    assert not [f for f in res.rglob("*") if f.name == "lock" or f.name.endswith(".tmp")]


def test_disk_full_during_training_one_line_naming_the_file_then_resume(tmp_path):
    """A write that fails for want of room while a run trains (a file-size limit: EFBIG, as a full
    disk gives ENOSPC) ends the command with one line naming the file, exit 2, no temp file and no
    lock left; the same command with room again trains the run to its end."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))   # below one checkpoint of mlp:256-256

    args = ["train", "teacher", "-d", "digits", "-m", "mlp:256-256", "--epochs", "2", "--results", tmp_path / "r",
            "--name", "x", "-x", "debug", "--device", "cpu"]
    p = subprocess.run(CLI + [str(a) for a in args], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                       timeout=300, preexec_fn=limited)
    line = one_error(p)
    assert line.startswith("error: File too large: ") and str(tmp_path / "r" / "x" / "runs") in line, line
    assert not [f for f in (tmp_path / "r").rglob("*") if f.name.endswith(".tmp") or f.name == "lock"]
    (rd,) = run_dirs(tmp_path / "r" / "x")
    assert not (rd / "final.json").exists() and not (rd / "failed.json").exists()
    ok(cli(args, tmp_path))
    assert json.loads((rd / "final.json").read_text())["status"] == "done" and metrics_epochs(rd) == [1, 2]
