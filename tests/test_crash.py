"""Crash consistency, non-finite losses and concurrent sweeps, through the real CLI.

* a corrupt or truncated ckpt-last.pt falls back to ckpt-prev.pt; the resumed run ends with the
  metrics and weights of an uninterrupted one;
* SIGKILL at seeded random moments (the process group of ``effdstl run -x debug``, so the kill
  hits the trainer), resumed each time: same metrics and weights as an uninterrupted run, and
  ``effdstl results`` holds every run exactly once;
* a student whose loss turns non-finite is marked failed (failed.json: reason, last good
  checkpoint) while its group finishes; status/results show it; a re-run retrains nothing;
* two sweeps of one study at once: the second names the pid holding the lock, waits for it, and
  both succeed with every run trained once; a lock left by a dead process is taken over.

``EFFDSTL_CRASH_OUT=FILE`` writes what these tests saw (kills landed, lock messages) as JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import cli_env
from effdstl_cli.files import read_jsonl

TIMING = ("epoch_s",)                       # metrics fields that measure time, not learning
FINAL_TIMING = ("wall_s", "gpu_hours", "finished_at", "files", "checksum")  # + the seal: checksums of files holding timings
REPORT: dict = {}


env_for = cli_env  # offline, one thread, wide columns (tests/conftest.py)


CLI = [sys.executable, "-m", "effdstl_cli.cli"]


def cli(args: list, cwd: Path, timeout: float = 240, prefix: list | None = None, **env) -> subprocess.CompletedProcess:
    return subprocess.run((prefix or CLI) + [str(a) for a in args], cwd=cwd, env=env_for(**env),
                          capture_output=True, text=True, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout:\n{p.stdout}\n--- stderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr
    return p


def study(path: Path, name: str, teacher_epochs: int = 1, epochs: int = 2, schemes=("full",), **over) -> Path:
    s = {"name": name, "kind": "replacement", "dataset": "synthetic", "seeds": [0], "batch_size": 64,
         "teachers": {"weak": {"model": "mlp:32", "epochs": teacher_epochs},
                      "strong": {"model": "mlp:64", "epochs": teacher_epochs}},
         "teacher_schedule": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "seed": 0},
         "triplets": [{"weak": "weak", "strong": "strong", "student": "mlp:16"}],
         "schedule": {"epochs": epochs, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
         "distill": {"tau": 1.0, "lam": 1.0},
         "grid": {"scheme": list(schemes), "subset": ["reg_cor"]}}
    s.update(over)
    f = path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(s, sort_keys=False))
    return f


def runs(study_dir: Path) -> dict[str, Path]:
    return {d.name: d for d in sorted((study_dir / "runs").glob("*/")) if (d / "config.yaml").exists()}


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run_dir / "metrics.jsonl")]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    """Metrics (minus timing) and final weights identical; epochs 1..E, each once."""
    ra, rb = rows(a), rows(b)
    assert [r["epoch"] for r in rb] == list(range(1, len(rb) + 1)) and len(rb) == len(ra), (b, [r["epoch"] for r in rb])
    assert ra == rb, b
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (b, k)
    fa, fb = (json.loads((d / "final.json").read_text()) for d in (a, b))
    assert {k: v for k, v in fa.items() if k not in FINAL_TIMING} == {k: v for k, v in fb.items() if k not in FINAL_TIMING}


def no_debris(study_dir: Path) -> None:
    """No lock left behind, no temp file of a killed writer."""
    for d in runs(study_dir).values():
        assert not (d / "lock").exists(), d
        assert not list(d.glob(".*.tmp")), list(d.glob(".*.tmp"))


def results_once(study_dir: Path, cwd: Path, n_runs: int) -> "object":
    import pandas as pd

    ok(cli(["results", study_dir.name, "--results", study_dir.parent, "--format", "csv"], cwd))
    df = pd.read_csv(study_dir / "tables" / "results.csv")
    assert len(df) == n_runs and df["run"].is_unique, df[["run", "state"]]
    return df


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    out = os.environ.get("EFFDSTL_CRASH_OUT")
    if out:
        Path(out).write_text(json.dumps(REPORT, indent=1, default=str) + "\n")


# -- 1. corrupt latest checkpoint ------------------------------------------------------------------

# --device cpu: the partial run below is made in this process on the CPU; CUDA numbers differ
TEACHER_ARGS = ["train", "teacher", "-d", "synthetic", "-m", "mlp:32", "--epochs", "4", "--lr", "0.1",
                "--name", "t", "-x", "debug", "--device", "cpu"]


@pytest.fixture(scope="module")
def uninterrupted_teacher(tmp_path_factory):
    base = tmp_path_factory.mktemp("ref-teacher")
    ok(cli(TEACHER_ARGS + ["--results", base / "results"], base))
    (rd,) = runs(base / "results" / "t").values()
    return rd


@pytest.mark.parametrize("damage", ["flip", "both"])
def test_corrupt_last_checkpoint_falls_back(damage, uninterrupted_teacher, tmp_path):
    from effdstl_cli.engine import Env, train_group

    ref = uninterrupted_teacher
    cfg = yaml.safe_load((ref / "config.yaml").read_text())
    rd = tmp_path / "results" / "t" / "runs" / ref.name
    # 3 of 4 epochs, then stop (as a preempted job would): ckpt-last = epoch 3, ckpt-prev = epoch 2
    # (ckpt_share 0: a checkpoint every epoch; by default tiny epochs are checkpointed on a time cadence)
    (rec,) = train_group([(cfg, rd)], Env(device="cpu", stop_after_epochs=3, ckpt_share=0, log=lambda m: None))
    assert rec["status"] == "partial" and [r["epoch"] for r in rows(rd)] == [1, 2, 3]
    assert (rd / "ckpt-prev.pt").exists()

    def damage_file(p: Path) -> None:
        blob = bytearray(p.read_bytes())
        if damage == "truncate":
            p.write_bytes(bytes(blob[: len(blob) // 2]))
        else:
            mid = len(blob) // 2
            blob[mid:mid + 64] = bytes(b ^ 0xFF for b in blob[mid:mid + 64])
            p.write_bytes(bytes(blob))

    damage_file(rd / "ckpt-last.pt")
    if damage == "both":
        damage_file(rd / "ckpt-prev.pt")
    p = ok(cli(TEACHER_ARGS + ["--results", tmp_path / "results"], tmp_path))
    said = p.stdout + p.stderr                          # the fallback is said, not silent
    assert "ckpt-last.pt is corrupt" in said
    assert ("starts over" if damage == "both" else "fell back to the previous checkpoint ckpt-prev.pt") in said
    assert_same_run(ref, rd)
    no_debris(tmp_path / "results" / "t")
    REPORT.setdefault("corrupt_checkpoint", []).append(damage)


# -- 2. SIGKILL at random moments ------------------------------------------------------------------

def _kill_study(tmp: Path) -> Path:
    return study(tmp, "k", teacher_epochs=4, epochs=8, schemes=("full", "partial"))


def test_sigkill_at_random_moments_then_resume(tmp_path):
    f = _kill_study(tmp_path)
    ok(cli(["run", "-s", f, "--results", tmp_path / "ref", "-x", "debug"], tmp_path))
    ref = runs(tmp_path / "ref" / "k")
    assert len(ref) == 6
    total = sum(len(read_jsonl(d / "metrics.jsonl")) for d in ref.values())   # epochs of the whole study

    out = tmp_path / "crash"
    sd = out / "k"
    rng = random.Random(20230607)
    teach = sum(len(read_jsonl(d / "metrics.jsonl")) for d in ref.values()
                if yaml.safe_load((d / "config.yaml").read_text())["role"] == "teacher")
    # Four kill moments, seeded: after a random number of epochs are on disk (one while the teachers
    # train, three spread over the student group), plus a random fraction of an epoch, so a kill
    # lands anywhere: in a step, an evaluation, a checkpoint, metrics or final write.
    third = (total - teach) // 3
    targets = [rng.randrange(1, teach)] + [rng.randrange(teach + q * third, teach + (q + 1) * third) for q in range(3)]
    on_disk = lambda: sum(len(read_jsonl(d / "metrics.jsonl")) for d in runs(sd).values()) if sd.exists() else 0  # noqa: E731
    kills = []
    for target in targets:
        proc = subprocess.Popen(CLI + ["run", "-s", str(f), "--results", str(out), "-x", "debug"], cwd=tmp_path,
                                env=env_for(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            t0 = time.time()
            while proc.poll() is None and on_disk() < target and time.time() - t0 < 600:  # a busy machine starts slowly
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.06))
            alive = proc.poll() is None
            if alive:
                os.killpg(proc.pid, signal.SIGKILL)   # the whole group: the trainer is this process
                proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        kills.append({"after_epochs": target, "landed": alive, "epochs_on_disk": on_disk(),
                      "runs_finished": sum((d / "final.json").exists() for d in runs(sd).values()),
                      "lock_left": sum((d / "lock").exists() for d in runs(sd).values()),
                      "tmp_left": sum(len(list(d.glob(".*.tmp"))) for d in runs(sd).values())})
    REPORT["sigkill"] = {"study_epochs": total, "kills": kills}
    assert sum(k["landed"] for k in kills) >= 3, kills               # the kills hit a live trainer
    assert any(0 < k["epochs_on_disk"] < total for k in kills), kills  # ... in the middle of training
    ok(cli(["run", "-s", f, "--results", out, "-x", "debug"], tmp_path))   # resume to the end
    got = runs(sd)
    assert got.keys() == ref.keys()
    for h in ref:
        assert_same_run(ref[h], got[h])
    no_debris(sd)
    df = results_once(sd, tmp_path, 6)
    assert set(df["state"]) == {"done"}


# -- 3. non-finite loss in one student of a group --------------------------------------------------

def test_nan_student_fails_alone_and_stays_failed(tmp_path):
    s = {"name": "nan", "kind": "recipe", "dataset": "synthetic", "seeds": [0], "batch_size": 64,
         "teachers": {"weak": {"model": "mlp:16", "epochs": 1}, "strong": {"model": "mlp:32", "epochs": 1}},
         "teacher_schedule": {"lr": 0.1, "seed": 0}, "baselines": ["none"],
         # stage 2 has its own lr: 1e30 blows EffDstl up (and would KD/RKD/WSL, which switch teacher
         # with the same stage-2 schedule, docs/METHOD.md 'Table 1'); no distill is one stage-1-schedule run
         "recipe": {"student": "mlp:16", "stage1": {"epochs": 1, "lr": 0.1}, "stage2": {"epochs": 1, "lr": 1.0e30}}}
    f = tmp_path / "nan.yaml"
    f.write_text(yaml.safe_dump(s))
    res = tmp_path / "results"
    p = cli(["run", "-s", f, "--results", res, "-x", "debug"], tmp_path)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    (err,) = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert "1 run(s) of study 'nan' failed" in err and "EffDstl" in err, err
    assert re.search(r"non-finite loss (at|in) epoch 2", err), err  # CPU checks every step, CUDA at the epoch's end

    rd = runs(res / "nan")
    cfgs = {h: yaml.safe_load((d / "config.yaml").read_text()) for h, d in rd.items()}
    (bad,) = [d for h, d in rd.items() if cfgs[h]["meta"]["label"] == "EffDstl"]
    failed = json.loads((bad / "failed.json").read_text())
    assert failed["status"] == "failed" and "non-finite" in failed["reason"] and failed["epoch"] == 1
    from effdstl_cli.files import load_checkpoint

    state, note = load_checkpoint(Path(failed["last_good_checkpoint"]).parent)
    assert note is None and state["epoch"] == 1 and Path(failed["last_good_checkpoint"]).exists()
    assert not (bad / "final.json").exists() and not (bad / "model.pt").exists()
    others = [d for d in rd.values() if d != bad]
    assert len(others) == 3 and all((d / "final.json").exists() for d in others)   # the group went on
    for d in others:
        assert [r["epoch"] for r in read_jsonl(d / "metrics.jsonl")] == list(range(1, cfgs[d.name]["epochs"] + 1))

    st = ok(cli(["status", "nan", "--results", res], tmp_path))
    line = next(ln for ln in st.stdout.splitlines() if bad.name in ln)
    assert "failed" in line and "EffDstl" in line and "3 done, 1 failed" in st.stdout
    df = results_once(res / "nan", tmp_path, 4)
    row = df[df["run"] == bad.name].iloc[0]
    assert row["state"] == "failed" and "non-finite" in row["fail_reason"]
    assert (df["state"] == "done").sum() == 3

    before = {d.name: {f.name: f.read_bytes() for f in d.iterdir() if f.is_file() and f.name != "job.json"}
              for d in rd.values()}
    again = cli(["run", "-s", f, "--results", res, "-x", "debug"], tmp_path)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    (err2,) = [ln for ln in again.stderr.splitlines() if ln.startswith("error:")]
    assert "kept as failed" in err2 and bad.name in err2 and "non-finite" in err2
    assert "running" not in again.stderr  # no job ran: nothing was retrained
    after = {d.name: {f.name: f.read_bytes() for f in d.iterdir() if f.is_file() and f.name != "job.json"}
             for d in rd.values()}
    assert after == before
    REPORT["nan"] = {"failed_run": bad.name, "reason": failed["reason"], "error": err, "rerun_error": err2}


# -- 4. two sweeps at once; stale locks -------------------------------------------------------------

SLOW_CLI = """\
import os, time
import effdstl_cli.engine as engine
_end_epoch = engine._end_epoch
def slow(*a, **k):  # test aid: a slow epoch without burning CPU
    time.sleep(float(os.environ.get("EFFDSTL_TEST_EPOCH_SLEEP", "0")))
    gate, t0 = os.environ.get("EFFDSTL_TEST_GATE"), time.time()
    while gate and not os.path.exists(gate) and time.time() - t0 < 120:  # held until the test opens it
        time.sleep(0.05)
    return _end_epoch(*a, **k)
engine._end_epoch = slow
from effdstl_cli.cli import main
main()
"""


def test_two_sweeps_at_once_do_not_train_a_run_twice(tmp_path):
    f = study(tmp_path, "c", teacher_epochs=3, epochs=3)
    slow = tmp_path / "slow_cli.py"
    slow.write_text(SLOW_CLI)
    res = tmp_path / "results"
    sd = res / "c"
    cmd = ["sweep", "replacement", "-s", f, "--results", res, "-x", "debug"]
    # The first sweep's epochs wait at a gate the test opens once the second sweep has said it
    # waits: the second meets a live holder however slowly it starts on a busy machine (it took
    # longer than the first's whole training at load 10).
    gate = tmp_path / "gate"
    first = subprocess.Popen([sys.executable, str(slow)] + [str(a) for a in cmd], cwd=tmp_path,
                             env=env_for(EFFDSTL_TEST_EPOCH_SLEEP="0.2", EFFDSTL_TEST_GATE=str(gate)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log2 = tmp_path / "second.log"
    try:
        t0 = time.time()
        while first.poll() is None and not list(sd.glob("runs/*/lock")) and time.time() - t0 < 60:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        with open(log2, "w") as fh:                                    # the same command, meanwhile
            sec = subprocess.Popen(CLI + [str(a) for a in cmd], cwd=tmp_path, env=env_for(), stdout=fh,
                                   stderr=subprocess.STDOUT, text=True)
            t0 = time.time()
            while sec.poll() is None and "waiting for it" not in log2.read_text() and time.time() - t0 < 110:
                time.sleep(0.05)
            gate.touch()
            sec.wait(timeout=240)
        second = subprocess.CompletedProcess(sec.args, sec.returncode, log2.read_text(), "")
        out1, err1 = first.communicate(timeout=240)
    finally:
        gate.touch()
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == 0, err1
    # issue 14: the second waits for the run the first trains (was: exit 2 naming the holder), then
    # finds it done; both succeed and nothing is trained twice
    assert second.returncode == 0 and "Traceback" not in second.stderr + second.stdout, second.stderr
    said = second.stdout + second.stderr
    (err,) = [ln for ln in said.splitlines() if "waiting for it" in ln][:1] or [said[-3000:]]
    assert re.search(rf"is being trained by pid {first.pid} on {re.escape(socket.gethostname())}: waiting", err), err

    ok(cli(cmd, tmp_path))                                            # afterwards: nothing left to do
    rd = runs(sd)
    assert len(rd) == 5
    for d in rd.values():
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert [r["epoch"] for r in read_jsonl(d / "metrics.jsonl")] == list(range(1, cfg["epochs"] + 1)), d
        assert (d / "final.json").exists() and (d / "model.pt").exists()
        torch.load(d / "model.pt", weights_only=True)                 # intact
    no_debris(sd)
    results_once(sd, tmp_path, 5)
    REPORT["lock_contention"] = {"holder_pid": first.pid, "second_sweep_error": err}


def test_stale_locks_are_taken_over(tmp_path):
    from effdstl_cli.config import load_study
    from effdstl_cli.studies import plan

    f = study(tmp_path, "s")
    res = tmp_path / "results"
    p = plan(load_study(f), res)
    teacher_dirs = [d for j in p.jobs if j.name.startswith("teacher-") for _, d in j.runs]
    assert len(teacher_dirs) == 2
    dead = subprocess.Popen(["true"])
    dead.wait()                                                       # a pid that no longer runs
    teacher_dirs[0].mkdir(parents=True)
    (teacher_dirs[0] / "lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                      "started": time.time() - 60}))
    teacher_dirs[1].mkdir(parents=True)
    (teacher_dirs[1] / "lock").write_text('{"pid": 12')                # half-written by a killed writer
    old = time.time() - 60
    os.utime(teacher_dirs[1] / "lock", (old, old))
    # a lock naming a live process that is not its holder (the PID was reused after a kill -9, an
    # OOM kill or a reboot): issue 19, the CLI waited for it forever
    reused = subprocess.Popen(["sleep", "300"])
    try:
        student_dirs = [d for j in p.jobs if not j.name.startswith("teacher-") for _, d in j.runs]
        student_dirs[0].mkdir(parents=True)
        (student_dirs[0] / "lock").write_text(json.dumps({"pid": reused.pid, "host": socket.gethostname(),
                                                          "started": time.time() - 60}))  # before that process began
        p2 = ok(cli(["run", "-s", f, "--results", res, "-x", "debug"], tmp_path, timeout=120))
        assert "waiting for it" not in p2.stdout + p2.stderr
    finally:
        reused.kill()
        reused.wait()
    for d in teacher_dirs + student_dirs[:1]:
        assert (d / "final.json").exists() and not (d / "lock").exists()
        assert [r["epoch"] for r in read_jsonl(d / "metrics.jsonl")] == ([1] if d in teacher_dirs else [1, 2])
    no_debris(res / "s")
    # kill -9 right after a run finished left its lock: the next look (status, a sweep) removes it
    dead_lock = {"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 60}
    (teacher_dirs[0] / "lock").write_text(json.dumps(dead_lock))
    ok(cli(["status", "s", "--results", res], tmp_path))
    assert not (teacher_dirs[0] / "lock").exists()
    REPORT["stale_locks"] = ["dead pid", "half-written lock file", "reused pid", "finished run"]


def test_lock_knows_its_holder(tmp_path):
    """A lock records its holder's PID, start time (/proc/<pid>/stat) and boot id: the same PID in
    another process, or a lock from before a reboot, is not a live holder; the real holder is."""
    from effdstl_cli.files import RunLock, boot_id, proc_start

    lock = RunLock(tmp_path).acquire()
    me = lock.holder()
    assert me["pid"] == os.getpid() and me["pid_start"] == proc_start(os.getpid()) and me["boot_id"] == boot_id()
    assert RunLock(tmp_path).alive()                                    # the live holder
    lock.release()
    other = subprocess.Popen(["sleep", "300"])
    try:
        for fake in ({"pid_start": proc_start(other.pid) - 1},         # the PID now names another process
                     {"pid_start": proc_start(other.pid), "boot_id": "0" * 8 + "-before-a-reboot"},
                     {"started": time.time() - 3600}):                  # older lock: written before it began
            (tmp_path / "lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                       "started": time.time(), **fake}))
            assert not RunLock(tmp_path).alive(), fake
            assert not (tmp_path / "lock").exists(), fake              # removed on that look
        (tmp_path / "lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": time.time(),
                                                   "pid_start": proc_start(other.pid), "boot_id": boot_id()}))
        assert RunLock(tmp_path).alive()                                # the true holder holds it
    finally:
        other.kill()
        other.wait()


RELEASE_UNDER_SIGINT = """\
import json, os, signal, sys
from pathlib import Path
from effdstl_cli import files as fio
dirs = [Path(sys.argv[1]) / f"r{i}" for i in range(4)]
for d in dirs:
    d.mkdir()
locks = [fio.RunLock(d).acquire() for d in dirs]
holder, sent = fio.RunLock.holder, []
def holder_then_sigint(self):  # the terminal's second Ctrl-C arrives inside RunLock.release()
    if not sent:
        sent.append(1)
        os.kill(os.getpid(), signal.SIGINT)
    return holder(self)
fio.RunLock.holder = holder_then_sigint
interrupted = False
try:
    fio.release_all(locks)
except KeyboardInterrupt:
    interrupted = True
print(json.dumps({"interrupted": interrupted, "left": [str(d) for d in dirs if (d / "lock").exists()]}))
"""


def test_second_sigint_inside_release_leaves_no_lock(tmp_path):
    """Ctrl-C reaches a local job twice (the terminal's and the launcher's SIGINT); the second
    used to land inside RunLock.release() and leave the other runs' locks (issue 19: four). The
    locks are given back with signals held: all go, then the interrupt goes on."""
    script = tmp_path / "release.py"
    script.write_text(RELEASE_UNDER_SIGINT)
    p = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                       env=env_for(), timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got == {"interrupted": True, "left": []}
