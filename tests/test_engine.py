"""The group engine on real (synthetic, learnable) data: learning, resume, determinism,
solo == group, the two-stage teacher switch, and non-finite losses."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from effdstl_cli.config import config_hash
from effdstl_cli.engine import Env, lr_at, train_group
from effdstl_cli.files import read_jsonl

DATA = "synthetic"


def stage(epochs, distiller, lr=0.05, wd=5e-4, min_lr=0.0, warmup=0):
    return {"epochs": epochs, "distiller": distiller,
            "optim": {"lr": lr, "momentum": 0.9, "weight_decay": wd, "nesterov": False},
            "sched": {"warmup_epochs": warmup, "min_lr": min_lr}}


def run_cfg(model="mlp:32", stages=None, teachers=None, seed=0, batch=64, label=""):
    stages = stages or [stage(3, {"name": "none"})]
    return {"role": "student", "dataset": DATA, "data_root": None, "image_size": None, "model": model,
            "seed": seed, "batch_size": batch, "epochs": sum(s["epochs"] for s in stages), "stages": stages,
            "teachers": teachers or {}, "meta": {"label": label}}


def train(cfgs, root: Path, **env):
    pairs = [(c, root / config_hash(c)) for c in cfgs]
    recs = train_group(pairs, Env(device="cpu", log=lambda m: None, **env))
    return pairs, recs


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    cfg = run_cfg("mlp:128", [stage(6, {"name": "none"}, lr=0.1)])
    cfg["role"] = "teacher"
    (pair,), (rec,) = train([cfg], root)
    assert rec["status"] == "done"
    return {"model": "mlp:128", "ckpt": str(pair[1] / "model.pt")}, rec


def history(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "epoch_s"} for r in read_jsonl(run_dir / "metrics.jsonl")]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


def test_lr_schedule_cosine_and_warmup():
    st = stage(10, {"name": "none"}, lr=0.5, min_lr=0.01, warmup=2)
    assert lr_at(st, 1.0) == pytest.approx(0.25)         # halfway through warm-up
    assert lr_at(st, 2.0) == pytest.approx(0.5)          # peak
    assert lr_at(st, 6.0) == pytest.approx(0.255)        # cosine midpoint: (0.5 + 0.01) / 2
    assert lr_at(st, 10.0) == pytest.approx(0.01)        # floor


def test_group_of_three_all_learn(teacher, tmp_path):
    tref, trec = teacher
    assert trec["best_top1"] > 50
    cfgs = [run_cfg(stages=[stage(4, d)], teachers={"weak": tref}, label=d["name"])
            for d in ({"name": "none"}, {"name": "kd", "teacher": "weak", "tau": 4.0, "lam": 0.9},
                      {"name": "ckm", "teacher": "weak"})]
    for c in cfgs:
        if c["stages"][0]["distiller"]["name"] == "none":
            c["teachers"] = {}
    t0 = time.time()
    pairs, recs = train(cfgs, tmp_path)
    for (cfg, d), rec in zip(pairs, recs):
        assert rec["status"] == "done", rec
        assert rec["best_top1"] > 40, (cfg["meta"]["label"], rec)  # 10 classes: chance is 10%
        rows = read_jsonl(d / "metrics.jsonl")
        assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
        assert rows[-1]["train_loss"] < rows[0]["train_loss"]
        final = json.loads((d / "final.json").read_text())
        assert final["config_hash"] == d.name and final["epochs"] == 4
        assert t0 < final["finished_at"] <= time.time()   # the end time travels with the run, unlike the file's mtime


def test_resume_equals_uninterrupted(teacher, tmp_path):
    tref, _ = teacher
    cfg = run_cfg(stages=[stage(3, {"name": "kd", "teacher": "weak", "tau": 2.0, "lam": 0.5})],
                  teachers={"weak": tref})
    (full,), _ = train([cfg], tmp_path / "a")
    (part,), (rec,) = train([cfg], tmp_path / "b", stop_after_epochs=1)
    assert rec["status"] == "partial" and len(read_jsonl(part[1] / "metrics.jsonl")) == 1
    assert not (part[1] / "final.json").exists()
    train([cfg], tmp_path / "b")  # resumes from epoch 1
    assert history(part[1]) == history(full[1])
    for k, v in weights(full[1]).items():
        assert torch.equal(v, weights(part[1])[k]), k


def test_same_seed_same_numbers_other_seed_differs(tmp_path):
    a = run_cfg(seed=3)
    (pa,), _ = train([a], tmp_path / "a")
    (pb,), _ = train([a], tmp_path / "b")
    assert history(pa[1]) == history(pb[1])
    (pc,), _ = train([run_cfg(seed=4)], tmp_path / "c")
    assert history(pc[1]) != history(pa[1])


def test_group_member_equals_solo_run(teacher, tmp_path):
    """Grouping changes nothing but the cost: bit-identical metrics and weights on CPU."""
    tref, _ = teacher
    kd = run_cfg(stages=[stage(2, {"name": "kd", "teacher": "weak", "tau": 4.0, "lam": 0.9})], teachers={"weak": tref})
    others = [run_cfg(stages=[stage(2, {"name": "none"})]),
              run_cfg(stages=[stage(2, {"name": "replace", "teacher": "weak", "strong": "weak",
                                        "scheme": "partial", "subset": "reg"})], teachers={"weak": tref})]
    (solo,), _ = train([kd], tmp_path / "solo")
    # the loop's guarantee; a fused group equals it to rounding (test_fused.py)
    pairs, _ = train([others[0], kd, others[1]], tmp_path / "group", fuse="off")
    grouped = pairs[1][1]
    assert history(grouped) == history(solo[1])
    for k, v in weights(solo[1]).items():
        assert torch.equal(v, weights(grouped)[k]), k


def test_two_stage_switches_teacher_and_optimizer(teacher, tmp_path):
    tref, _ = teacher
    cfg = run_cfg(stages=[stage(2, {"name": "wsl", "teacher": "weak"}, lr=0.1, min_lr=0.001),
                          stage(2, {"name": "ckm", "teacher": "strong"}, lr=0.02, min_lr=0.002, wd=0.0)],
                  teachers={"weak": tref, "strong": tref})
    (p,), (rec,) = train([cfg], tmp_path)
    rows = read_jsonl(p[1] / "metrics.jsonl")
    assert [r["stage"] for r in rows] == [0, 0, 1, 1]
    assert set(rows[0]["losses"]) == {"ce_ls", "wsl"} and set(rows[2]["losses"]) == {"ckm"}
    assert rows[2]["lr"] <= 0.02 + 1e-9 and rows[1]["lr"] < 0.1
    assert 0.0 <= rows[3]["subset_frac"] <= 1.0 and rec["status"] == "done"


def test_non_finite_student_fails_alone(tmp_path):
    bad = run_cfg(stages=[stage(3, {"name": "none"}, lr=1e30)], label="explodes")
    good = run_cfg(stages=[stage(3, {"name": "none"}, lr=0.05)], label="fine")
    pairs, recs = train([bad, good], tmp_path)
    by = {c["meta"]["label"]: (d, r) for (c, d), r in zip(pairs, recs)}
    d_bad, r_bad = by["explodes"]
    assert r_bad["status"] == "failed" and "non-finite" in r_bad["reason"]
    failed = json.loads((d_bad / "failed.json").read_text())
    assert failed["reason"] == r_bad["reason"] and not (d_bad / "final.json").exists()
    d_good, r_good = by["fine"]
    assert r_good["status"] == "done" and r_good["epochs"] == 3
    # Running the group again keeps the failure and does not retrain the finished run.
    again = train_group(pairs, Env(device="cpu", log=lambda m: None))
    assert [r["status"] for r in again] == ["failed", "done"]
