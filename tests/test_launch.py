"""launch.py without Slurm: dry runs, the missing-cluster error, gloo DDP, kill -9 + resume, the
local bounded queue. Every test drives the real ``effdstl`` command in a subprocess where the
acceptance is about the command; teachers are trained once in-process (a second each).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, cli_env, effdstl_cmd, metrics_epochs, run_cli, run_dirs, write_study
from effdstl_cli.launch import LaunchOptions, _job_resources, _local_slots, _result, slurm_parameters


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Two small MLP teachers on synthetic, trained in this process: {'weak': model.pt, 'strong': ...}."""
    import torch

    from effdstl_cli.engine import Env, train_group
    from effdstl_cli.runconfig import DEFAULT_SCHEDULE, stage as _stage

    root = tmp_path_factory.mktemp("teachers")
    threads = torch.get_num_threads()
    out = {}
    try:
        for name, model, epochs in (("weak", "mlp:16", 1), ("strong", "mlp:64", 3)):
            st = _stage({**DEFAULT_SCHEDULE, "epochs": epochs, "weight_decay": 0.0}, {"name": "none"})
            cfg = {"role": "teacher", "dataset": "synthetic", "data_root": None, "image_size": None, "model": model,
                   "seed": 0, "batch_size": 64, "epochs": epochs, "stages": [st], "teachers": {},
                   "meta": {"label": f"teacher {name}"}}
            train_group([(cfg, root / name)], Env(device="cpu", log=lambda m: None))
            out[name] = root / name / "model.pt"
    finally:
        torch.set_num_threads(threads)  # the engine sets 1 thread for the whole process
    return out


def _ckpt_teachers(t: dict[str, Path]) -> dict:
    return {"weak": {"model": "mlp:16", "ckpt": str(t["weak"])},
            "strong": {"model": "mlp:64", "ckpt": str(t["strong"])}}


def _no_slurm_path(tmp_path: Path) -> str:
    """A PATH with no Slurm client (nor anything else) on it."""
    d = tmp_path / "empty-bin"
    d.mkdir(exist_ok=True)
    return str(d)


# -- 5. dry run of the paper's ImageNet sweep: no ImageNet, no Slurm ------------------------------

def _imagenet_like(path: Path) -> Path:
    s = {"name": "fig5-imagenet-like", "kind": "replacement", "dataset": "imagenet:/nonexistent/imagenet",
         "image_size": 224, "seeds": [0, 1], "batch_size": 1024,
         "teachers": {"weak": {"model": "tv:resnet34", "pretrained": True},
                      "strong": {"model": "timm:resnet34d", "pretrained": True}},
         "triplets": [{"weak": "weak", "strong": "strong", "student": "tv:resnet18"}],
         "schedule": {"epochs": 100, "lr": 0.5, "momentum": 0.9, "weight_decay": 4e-5, "warmup_epochs": 5,
                      "min_lr": 1e-5},
         "distill": {"tau": 1.0, "lam": 1.0},
         "grid": {"scheme": ["full", "partial", "confidence"], "subset": ["reg_cor", "reg", "correct"]}}
    path.write_text(yaml.safe_dump(s, sort_keys=False))
    return path


def _check_dry_run(study_file: Path, tmp_path: Path) -> None:
    study = yaml.safe_load(study_file.read_text())
    results = tmp_path / "results"
    p = run_cli("sweep", "replacement", "--study", study_file, "--executor", "slurm", "--gpus-per-job", "4",
                "--dry-run", "--results", results, cwd=tmp_path,
                env=cli_env(PATH=_no_slurm_path(tmp_path)), timeout=120)
    text = p.stdout
    lines = text.splitlines()
    assert not results.exists(), "a dry run must not write anything"
    # the cluster side: every job is one 4-GPU DDP job over nccl
    assert "4 GPU(s) per job" in text and "backend nccl" in text, text
    assert "--ntasks-per-node 4" in text and "--gpus-per-node 4" in text, text
    if str(study["dataset"]).startswith(("imagenet", "folder")):  # how the images will be decoded
        assert "DataLoader workers per process read the files" in text and "(--decode auto)" in text, text
    seeds = study.get("seeds", [0])
    jobs = [ln for ln in lines if ln.startswith("  ") and not ln.startswith("      ")]
    assert len(jobs) == len(seeds), text  # pretrained teachers: no teacher jobs, one group per seed
    assert all("gpus=4" in ln and "procs=4" in ln for ln in jobs), text
    # the paper's hyper-parameters, as the study file states them, on every run line shown
    sch = study["schedule"]
    hp = (f"bs {study['batch_size']}", f"{sch['epochs']} ep", f"lr {float(sch['lr']):g}->{float(sch['min_lr']):g}",
          f"wd {float(sch['weight_decay']):g}", f"warmup {float(sch['warmup_epochs']):g}")
    runs = [ln for ln in lines if ln.startswith("      ") and "..." not in ln and "fuse --" not in ln]
    assert runs, text
    # 224 px students on GPUs stay in the loop unless --fuse on (fused.policy; the dry run says so)
    assert "students of tv:resnet18: stepped in a loop (auto: 224 px" in text, text
    for ln in runs:
        for h in hp:
            assert h in ln, f"{h!r} missing from dry-run line: {ln}"
        assert "tv:resnet18" in ln
    n_grid = len(study["grid"]["scheme"]) * len(study["grid"]["subset"])
    assert f"runs={n_grid + 2}" in jobs[0], text  # + the two teacher-only baselines
    for t in study["teachers"].values():
        assert f"{t['model']} (pretrained)" in text, text


def test_dry_run_imagenet_like_study_needs_no_data_and_no_slurm(tmp_path):
    _check_dry_run(_imagenet_like(tmp_path / "fig5-imagenet-like.yaml"), tmp_path)


def test_dry_run_figure5_imagenet(tmp_path):
    study = ROOT / "studies" / "figure5-imagenet.yaml"
    assert study.exists(), "studies/figure5-imagenet.yaml is missing"
    s = yaml.safe_load(study.read_text())
    models = {t["model"] for t in s["teachers"].values()}
    assert {"tv:resnet34", "timm:resnet34d"} <= models and s["triplets"][0]["student"] == "tv:resnet18"
    _check_dry_run(study, tmp_path)


def test_decode_option_reaches_the_engine_and_rejects_unknown_modes(tmp_path):
    from effdstl_cli.errors import EffdstlError
    from effdstl_cli.launch import _env_kw

    assert _env_kw(LaunchOptions(decode="workers"))["gpu_decode"] is False
    assert _env_kw(LaunchOptions(decode="device"))["gpu_decode"] is True
    assert _env_kw(LaunchOptions())["gpu_decode"] is None          # auto: the engine picks by device
    kw = _env_kw(LaunchOptions(decode="mixed:0.35"))
    assert kw["gpu_decode"] is True and kw["cpu_share"] == 0.35
    for bad in ("mixed:0", "mixed:1", "mixed:1.5", "mixed:x", "mixed:"):
        with pytest.raises(EffdstlError, match="0 < F < 1"):
            LaunchOptions(decode=bad).validate()
    study = ROOT / "studies" / "figure5-imagenet.yaml"
    p = run_cli("sweep", "replacement", "--study", study, "--executor", "slurm", "--decode", "workers",
                "--dry-run", "--results", tmp_path / "r", cwd=tmp_path, env=cli_env(PATH=_no_slurm_path(tmp_path)))
    assert "decoded by PIL in the workers (--decode workers)" in p.stdout, p.stdout
    p = run_cli("sweep", "replacement", "--study", study, "--executor", "slurm", "--decode", "mixed:0.4",
                "--dry-run", "--results", tmp_path / "r", cwd=tmp_path, env=cli_env(PATH=_no_slurm_path(tmp_path)))
    assert "40% of each batch decoded by PIL in the workers, the rest on the device" in p.stdout, p.stdout
    p = run_cli("sweep", "replacement", "--study", study, "--decode", "gpu", "--dry-run",
                "--results", tmp_path / "r", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "--decode mode" in p.stderr and "gpu" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_slurm_parameters_of_a_4_gpu_job():
    from effdstl_cli.studies import Plan

    plan = Plan({"name": "x", "kind": "replacement", "dataset": "digits"}, Path("/tmp/x"), [])
    opts = LaunchOptions(executor="slurm", gpus_per_job=4, array_parallelism=3, timeout_min=60)
    p = slurm_parameters(plan, opts, ["12_0", "12_1"])
    assert (p["tasks_per_node"], p["gpus_per_node"], p["nodes"]) == (4, 4, 1)
    assert p["slurm_array_parallelism"] == 3 and p["timeout_min"] == 60
    assert p["slurm_additional_parameters"]["dependency"] == "afterok:12_0:12_1"
    assert opts.backend() == "nccl" and LaunchOptions(tasks=2).backend() == "gloo"
    assert _job_resources(opts, "probe") == (1, 1)  # a probe never runs 4 copies of itself
    assert slurm_parameters(plan, opts, work="probe")["tasks_per_node"] == 1


def test_result_of_a_multi_task_job():
    class Fake:
        def results(self):
            return [["rank0"], ["rank1"]]

        def result(self):  # what submitit does for a job with subtasks
            raise ValueError("You should use `results()` if your job has subtasks.")

    assert _result(Fake()) == ["rank0"]


# -- 7. --executor slurm without Slurm: one line, exit 2 ----------------------------------------------

@pytest.mark.parametrize("fake", ["no-sbatch", "sinfo-fails"])
def test_executor_slurm_without_a_cluster(tmp_path, tiny_study, fake):
    path = _no_slurm_path(tmp_path)
    if fake == "sinfo-fails":  # sbatch exists, but no controller answers
        for tool, rc in (("sbatch", 0), ("sinfo", 1), ("squeue", 1)):
            f = Path(path) / tool
            f.write_text(f"#!/bin/sh\necho 'slurm_load_partitions: Unable to contact slurm controller' >&2\nexit {rc}\n")
            f.chmod(0o755)
    t0 = time.time()
    p = run_cli("sweep", "replacement", "--study", tiny_study(), "--executor", "slurm", "--results",
                tmp_path / "r", cwd=tmp_path, env=cli_env(PATH=path), check=False, timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and "Slurm" in err[0], p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert time.time() - t0 < 60
    assert not list((tmp_path / "r").rglob("job.json")), "nothing may be submitted or run"


# -- 4. DDP: 2 gloo tasks = 1 process with the same global batch and seed -----------------------------

DISTILLERS = ["none", "kd", "wsl", "ckm", "replace:scheme=full,subset=reg_cor",
              "manipulate:kind=teacher_amp,delta=0.2,subset=correct"]


def test_ddp_two_tasks_match_one_process(tmp_path, teachers):
    """The same group, trained by one process (debug) and by a 2-task LocalExecutor job (gloo):
    same run hashes, the same final weights (float tolerance) and the same per-epoch losses."""
    common = ["train", "student", "--dataset", "synthetic", "--model", "mlp:32-16", "--teacher", teachers["weak"],
              "--strong", teachers["strong"], "--epochs", "2", "--batch-size", "64", "--lr", "0.1",
              "--name", "ddp"] + [a for d in DISTILLERS for a in ("-D", d)]
    run_cli(*common, "--results", tmp_path / "one", "--executor", "debug", cwd=tmp_path, timeout=240)
    run_cli(*common, "--results", tmp_path / "two", "--executor", "local", "--tasks", "2", cwd=tmp_path, timeout=240)
    import torch

    one, two = run_dirs(tmp_path / "one" / "ddp"), run_dirs(tmp_path / "two" / "ddp")
    assert len(one) == len(DISTILLERS) and [d.name for d in one] == [d.name for d in two]
    logs = list((tmp_path / "two" / "ddp" / "logs").glob("*/*_1_log.out"))
    assert logs, "the 2-task job has no second task"
    for a, b in zip(one, two):
        fa, fb = json.loads((a / "final.json").read_text()), json.loads((b / "final.json").read_text())
        assert (fa["world_size"], fb["world_size"]) == (1, 2)
        wa = torch.load(a / "model.pt", weights_only=True)["model"]
        wb = torch.load(b / "model.pt", weights_only=True)["model"]
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0), \
                f"run {a.name} ({fa.get('config_hash')}): {k} differs by {(wa[k] - wb[k]).abs().max():.3g}"
        ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
        mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in ma] == [r["epoch"] for r in mb] == [1, 2]
        for ra, rb in zip(ma, mb):
            assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4, abs=1e-6)
            assert ra["subset_frac"] == pytest.approx(rb["subset_frac"], abs=1e-6)
            assert ra["test_loss"] == pytest.approx(rb["test_loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("decode", ["workers", "mixed:0.5"])
def test_ddp_two_tasks_match_one_process_on_jpeg_folders(tmp_path, decode):
    """Folder data: each sample's crop is keyed by (epoch, index), so a rank's share of a batch is
    augmented as the single process augments it, by PIL in the workers or on the device."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 8)):
        for i in range(n):
            d = tmp_path / "jpegs" / split / f"c{i % 3}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = int(rng.integers(30, 60)), int(rng.integers(30, 60))
            Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC) \
                .save(d / f"{i}.jpg", quality=90)
    common = ["train", "student", "--dataset", f"folder:{tmp_path / 'jpegs'}", "--image-size", "16",
              "--model", "mlp:16", "--epochs", "2", "--batch-size", "16", "--lr", "0.1", "--name", "ddpf",
              "-D", "none", "--decode", decode, "--workers", "1", "--device", "cpu"]
    run_cli(*common, "--results", tmp_path / "one", "--executor", "debug", cwd=tmp_path, timeout=240)
    run_cli(*common, "--results", tmp_path / "two", "--executor", "local", "--tasks", "2", cwd=tmp_path, timeout=240)
    (a,), (b,) = run_dirs(tmp_path / "one" / "ddpf"), run_dirs(tmp_path / "two" / "ddpf")
    assert a.name == b.name and json.loads((b / "final.json").read_text())["world_size"] == 2
    wa = torch.load(a / "model.pt", weights_only=True)["model"]
    wb = torch.load(b / "model.pt", weights_only=True)["model"]
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0), f"{k} differs by {(wa[k] - wb[k]).abs().max():.3g}"


# -- 3. kill -9 of a local run mid-training, then the same command ---------------------------------

def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"timed out / process ended waiting for {what}\n{tail}")


@pytest.mark.parametrize("executor", ["local"])  # "debug" works the same (its log is the CLI's stdout)
def test_kill9_mid_training_then_same_command_resumes(tmp_path, teachers, executor):
    from effdstl_cli.files import load_checkpoint

    epochs = 6
    name = f"kill-{executor}"
    args = ["train", "student", "--dataset", "synthetic", "--model", "mlp:512-512", "--teacher", teachers["weak"],
            "--strong", teachers["strong"], "-D", "kd", "-D", "replace:scheme=full,subset=reg_cor", "-D", "none",
            "--epochs", str(epochs), "--batch-size", "16", "--name", name, "--results", tmp_path / "r",
            "--executor", executor]
    sdir = tmp_path / "r" / name
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(effdstl_cmd() + [str(a) for a in args], cwd=tmp_path, env=cli_env(),
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def mid():
            runs = run_dirs(sdir)
            return runs and max(len(metrics_epochs(d)) for d in runs) >= 2

        _wait_for(mid, 180, "two finished epochs", proc, log)
        assert not list(sdir.glob("runs/*/final.json")), "training ended before the kill: make it slower"
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and everything it started (controller, task)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    saved = {}
    for d in run_dirs(sdir):
        st, _ = load_checkpoint(d)
        saved[d.name] = (int(st["epoch"]), st["history"]) if st else (0, [])
    assert max(k for k, _ in saved.values()) >= 1 and all(k < epochs for k, _ in saved.values()), saved

    p = run_cli(*args, cwd=tmp_path, timeout=300)  # the same command again
    job_log = p.stdout + p.stderr
    if executor == "local":
        jid = json.loads(next(iter(run_dirs(sdir))).joinpath("job.json").read_text())["job_id"]
        job_log = (sdir / "logs" / jid / f"{jid}_0_log.out").read_text()
    for d in run_dirs(sdir):
        k, hist = saved[d.name]
        assert metrics_epochs(d) == list(range(1, epochs + 1)), d
        assert json.loads((d / "final.json").read_text())["status"] == "done"
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert rows[:k] == hist, "epochs saved before the kill were trained again"
        if k:
            assert f"run {d.name}: resumed from epoch {k} of {epochs}" in job_log, job_log[-3000:]
    # the results table holds each run exactly once
    run_cli("results", name, "--results", tmp_path / "r", "--format", "csv", cwd=tmp_path, timeout=120)
    df = pd.read_csv(sdir / "tables" / "results.csv")
    assert sorted(df["run"]) == sorted(d.name for d in run_dirs(sdir)) and len(df) == 3
    assert df["run"].is_unique and set(df["state"]) == {"done"}


# -- 6. the local executor's bounded queue ---------------------------------------------------------------

def test_local_executor_runs_at_most_max_parallel_jobs(tmp_path, teachers):
    """3 independent group jobs, --max-parallel 2: never more than 2 at once (2 at the start)."""
    study = write_study(tmp_path / "queue.yaml", name="queue", seeds=[0, 1, 2], epochs=2,
                        teachers=_ckpt_teachers(teachers))
    run_cli("sweep", "replacement", "--study", study, "--executor", "local", "--max-parallel", "2",
            "--results", tmp_path / "r", cwd=tmp_path, timeout=300)
    spans: dict[str, list[float]] = {}
    for d in run_dirs(tmp_path / "r" / "queue"):
        info = json.loads((d / "job.json").read_text())
        assert info["executor"] == "local"
        end = (d / "final.json").stat().st_mtime
        s = spans.setdefault(info["job"], [info["submitted_at"], end])
        s[1] = max(s[1], end)
    assert len(spans) == 3, spans
    events = sorted([(a, 1) for a, _ in spans.values()] + [(b, -1) for _, b in spans.values()],
                    key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    assert peak == 2, f"at most 2 local jobs at once, and 2 did run together: {spans}"


def test_local_slots_default_to_one_on_cpu():
    assert _local_slots(LaunchOptions(device="cpu")) == [None]
    assert _local_slots(LaunchOptions(device="cpu", max_parallel=3)) == [None, None, None]


def test_study_slurm_block_sets_gpus_per_job_on_slurm_only(tmp_path):
    """figure5-imagenet.yaml says `slurm: {gpus_per_job: 4}`: on Slurm that is the default without
    --gpus-per-job; a flag overrides it; other executors ignore it (they run where they are told)."""
    study = Path(__file__).resolve().parents[1] / "studies" / "figure5-imagenet.yaml"
    env = cli_env(PATH=_no_slurm_path(tmp_path))
    base = ("sweep", "replacement", "--study", study, "--dry-run", "--results", tmp_path / "r")
    slurm = run_cli(*base, "--executor", "slurm", cwd=tmp_path, env=env).stdout
    assert "4 GPU(s) per job" in slurm and "--gpus-per-node 4" in slurm, slurm
    one = run_cli(*base, "--executor", "slurm", "--gpus-per-job", "1", cwd=tmp_path, env=env).stdout
    assert "1 GPU(s) per job" in one and "--gpus-per-node 1" in one, one
    local = run_cli(*base, "--executor", "debug", cwd=tmp_path, env=env).stdout
    assert "GPU(s) per job" not in local and ", CPU" in local, local
