"""launch.py on a real Slurm cluster (scripts/local-slurm.sh: one node, 2 CPUs, 4 fake GPUs).

Skipped, with the reason, when the cluster does not answer. `make test` starts it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import job_ids, metrics_epochs, run_cli, run_dirs, write_study

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def _cluster(request):
    """The cluster, once `make test`'s start of it (beside the other tests) has ended."""
    done = os.environ.get("EFFDSTL_SLURM_STARTING")  # scripts/run-tests.sh writes the start's status there
    end = time.time() + 900
    while done and not Path(done).exists() and time.time() < end:
        time.sleep(1)
    return request.getfixturevalue("slurm_cluster")


def _scancel_leftovers(root: Path) -> None:
    """Cancel whatever a failed test left queued (job ids from the job.json files under root)."""
    ids = set()
    for f in Path(root).rglob("job.json"):
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if info.get("executor") == "slurm":
            ids.add(str(info["job_id"]).split("_")[0])
    if ids:
        subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=30)


def _sacct(*args: str) -> list[list[str]]:
    p = subprocess.run(["sacct", "-n", "-P", *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return [ln.split("|") for ln in p.stdout.splitlines() if ln.strip()]


def _sacct_until(pred, *args: str, timeout: float = 20) -> list[list[str]]:
    """sacct rows once ``pred(rows)`` holds (accounting lags the jobs by a moment)."""
    end = time.time() + timeout
    while True:
        rows = _sacct(*args)
        if pred(rows) or time.time() > end:
            return rows
        time.sleep(0.5)


def _t(s: str) -> datetime:
    return datetime.fromisoformat(s)


# -- 1 + 8. a Fig. 5-like sweep on Slurm -----------------------------------------------------------

EPOCHS = 2


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two teachers (one array) -> two seed groups (one array, after the teachers), parallelism 1."""
    tmp = tmp_path_factory.mktemp("slurm-sweep")
    study = write_study(tmp / "fig5-slurm.yaml", name="fig5-slurm", seeds=[0, 1], epochs=EPOCHS)
    results = tmp / "results"
    args = ("sweep", "replacement", "--study", study, "--executor", "slurm", "--results", results,
            "--array-parallelism", "1")
    try:
        first = run_cli(*args, cwd=tmp, timeout=300)
        yield {"args": args, "tmp": tmp, "dir": results / "fig5-slurm", "first": first}
    finally:
        _scancel_leftovers(results)


def test_sweep_finishes_every_run(sweep):
    sdir = sweep["dir"]
    runs = run_dirs(sdir)
    assert len(runs) == 2 + 2 * 3, [r.name for r in runs]  # 2 teachers; per seed 2 baselines + 1 replacement
    for d in runs:
        fin = json.loads((d / "final.json").read_text())
        assert fin["status"] == "done" and fin["config_hash"] == d.name
        cfg_epochs = 1 if "teacher" in json.loads((d / "job.json").read_text())["job"] else EPOCHS
        assert metrics_epochs(d) == list(range(1, cfg_epochs + 1))
    ids = sorted(set(job_ids(sdir).values()))
    assert len(ids) == 4, ids  # teacher-weak, teacher-strong, group-t0-s0, group-t0-s1
    rows = _sacct_until(lambda r: all(any(x[0] == i and x[1] == "COMPLETED" for x in r) for i in ids),
                        "-X", "-j", ",".join(ids), "-o", "JobID,State")
    for i in ids:
        assert [i, "COMPLETED"] in rows, (i, rows)
    assert (sdir / "logs").is_dir() and not list(Path(sweep["tmp"]).glob("slurm-*.out"))


def test_sweep_again_submits_nothing(sweep):
    sdir = sweep["dir"]
    before = {d.name: (d / "job.json").read_text() for d in run_dirs(sdir)}
    logs_before = sorted(p.name for p in (sdir / "logs").iterdir())
    p = run_cli(*sweep["args"], cwd=sweep["tmp"], timeout=120)
    out = p.stdout + p.stderr
    assert "nothing to do" in out, out
    assert "submitted" not in out, out
    assert {d.name: (d / "job.json").read_text() for d in run_dirs(sdir)} == before
    assert sorted(p.name for p in (sdir / "logs").iterdir()) == logs_before


def test_groups_go_out_as_one_bounded_array(sweep):
    sdir = sweep["dir"]
    by_job: dict[str, str] = {}
    for d in run_dirs(sdir):
        info = json.loads((d / "job.json").read_text())
        by_job[info["job"]] = str(info["job_id"])
    groups = sorted(v for k, v in by_job.items() if k.startswith("group"))
    teachers = sorted(v for k, v in by_job.items() if k.startswith("teacher"))
    assert all(re.fullmatch(r"\d+_\d+", i) for i in groups + teachers), by_job
    g_array, t_array = {i.split("_")[0] for i in groups}, {i.split("_")[0] for i in teachers}
    assert len(g_array) == 1 and len(t_array) == 1 and g_array != t_array, by_job
    assert sorted(i.split("_")[1] for i in groups) == ["0", "1"]
    sub = (sdir / "logs" / g_array.pop() / f"{groups[0].split('_')[0]}_submission.sh").read_text()
    assert "#SBATCH --array=0-1%1" in sub, sub
    assert re.search(r"#SBATCH --dependency=afterok:\d+_\d+:\d+_\d+", sub), sub
    # parallelism 1: the array's tasks ran one after the other, and only after both teachers
    rows = {r[0]: r for r in _sacct("-X", "-j", ",".join(groups + teachers), "-o", "JobID,Start,End")}
    (s0, e0), (s1, e1) = [(_t(rows[i][1]), _t(rows[i][2])) for i in groups]
    assert s1 >= e0 or s0 >= e1, rows
    t_end = max(_t(rows[i][2]) for i in teachers)
    assert min(s0, s1) >= t_end, rows


# -- 2. preemption: USR2 -> checkpoint() -> requeue -> resume -----------------------------------------

def test_preempted_job_requeues_and_resumes(tmp_path):
    """A teacher with ~0.5 s epochs; USR2 after >= 2 epochs; it requeues (sacct shows REQUEUED,
    the log says restart 1 and 'resumed from epoch k') and its metrics are exactly 1..E."""
    epochs = 8
    results = tmp_path / "results"
    args = ("train", "teacher", "--dataset", "synthetic", "--model", "mlp:1024-1024", "--batch-size", "16",
            "--epochs", epochs, "--name", "preempt", "--results", results, "--executor", "slurm", "--no-wait")
    try:
        run_cli(*args, cwd=tmp_path, timeout=120)
        sdir = results / "preempt"
        (run,) = [d for d in (sdir / "runs").iterdir() if (d / "job.json").exists()]  # no config.yaml yet
        jid = json.loads((run / "job.json").read_text())["job_id"]
        assert re.fullmatch(r"\d+", jid), jid
        # the same command while the job is queued or running: found in squeue, not submitted twice
        again = run_cli(*args, cwd=tmp_path, timeout=120)
        assert f"already queued as Slurm job {jid}" in again.stdout + again.stderr, again.stdout + again.stderr
        assert json.loads((run / "job.json").read_text())["job_id"] == jid

        def wait(cond, timeout, what):
            end = time.time() + timeout
            while not cond():
                if time.time() > end:
                    logs = "\n".join(p.read_text()[-2000:] for p in sdir.glob("logs/*/*_log.*"))
                    pytest.fail(f"timed out waiting for {what}\n{logs}")
                time.sleep(0.1)

        wait(lambda: len(metrics_epochs(run)) >= 2, 180, "two epochs")
        assert not (run / "final.json").exists(), "the job finished before the signal: make it slower"
        subprocess.run(["scancel", "--signal=USR2", jid], check=True, timeout=30)
        wait(lambda: (run / "final.json").exists(), 240, "the requeued job to finish")

        assert metrics_epochs(run) == list(range(1, epochs + 1))
        log = (sdir / "logs" / jid / f"{jid}_0_log.out").read_text()
        assert "restart 1" in log, log
        m = re.search(rf"run {run.name}: resumed from epoch (\d+) of {epochs}", log)
        assert m and 2 <= int(m.group(1)) < epochs, log
        states = [r[1] for r in _sacct_until(lambda r: any(x[1] == "COMPLETED" for x in r),
                                             "-X", "-D", "-j", jid, "-o", "JobID,State")]
        assert "REQUEUED" in states and states[-1] == "COMPLETED", states
    finally:
        _scancel_leftovers(results)
