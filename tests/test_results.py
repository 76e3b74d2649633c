"""results.py: collect run directories (docs/RUNDIR.md), normalized accuracy, summaries.

The run directories here are written by hand, exactly as docs/RUNDIR.md lays them out.
``make_run`` / ``make_study`` are reused by tests/test_plots.py.
"""

from __future__ import annotations

import hashlib
import json
import time
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from effdstl_cli.errors import EffdstlError
from effdstl_cli.results import collect, interval95, normalized, summarize, t975, write_table

META_KEYS = ("study", "study_kind", "dataset", "student", "weak", "strong", "triplet", "distiller",
             "scheme", "subset", "param", "baseline", "label", "seed")


# -- builders: run directories exactly as docs/RUNDIR.md --------------------------------------

def make_run(study_dir: Path, *, role: str = "student", state: str = "done", best: float | None = None,
             last: float | None = None, epochs: int = 4, metrics: list[dict] | None = None,
             gpu_hours: float = 0.0, wall_s: float = 12.3, device: str = "cpu", gpu_name: str | None = None,
             truncated: bool = False, **meta) -> Path:
    """One run directory: config.yaml (+ metrics.jsonl, final.json / failed.json by ``state``)."""
    m = {"study": study_dir.name, "study_kind": "replacement", "dataset": "digits", "student": "mlp:32",
         "weak": "mlp:16", "strong": "mlp:256-256", "triplet": "", "distiller": "replace", "scheme": "",
         "subset": "", "param": None, "baseline": "", "label": "", "seed": 0}
    m.update(meta)
    if not m["triplet"] and role == "student":
        m["triplet"] = f"{m['weak']}|{m['strong']}|{m['student']}"
    cfg = {"role": role, "dataset": m["dataset"], "data_root": None, "image_size": None,
           "model": m["student"], "seed": m["seed"], "batch_size": 64, "epochs": epochs,
           "stages": [{"epochs": epochs,
                       "distiller": {"name": m["distiller"] or "none", "teacher": "weak", "scheme": m["scheme"],
                                     "subset": m["subset"], "tau": 1.0, "lam": 1.0},
                       "optim": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0005, "nesterov": False},
                       "sched": {"warmup_epochs": 0, "min_lr": 0.0}}],
           "teachers": {"weak": {"model": m["weak"], "run": "abc"}} if role == "student" else {},
           "meta": m}
    # named unlike a config hash: a hand-made run is not the engine's, so the name-to-config check
    # (rundir.identity_problem) leaves it alone; its meta makes the name unique
    h = "hand-" + hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]
    rd = study_dir / "runs" / h
    assert not rd.exists(), "two hand-made runs with one config"
    rd.mkdir(parents=True)
    (rd / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if state == "pending":
        return rd
    best = 90.0 if best is None else best
    last = best - 0.2 if last is None else last
    if metrics is None:
        n = epochs if state == "done" else max(1, epochs // 2)
        metrics = [{"epoch": e, "stage": 0, "lr": 0.1, "train_loss": 1.0 / e, "train_top1": 80.0 + e,
                    "test_loss": 1.2 / e, "test_top1": best - (epochs - e) * 0.5, "test_top5": 99.0,
                    "epoch_s": 0.4, "losses": {"kd": 1.0 / e}, "subset_frac": 0.3} for e in range(1, n + 1)]
    text = "".join(json.dumps(r) + "\n" for r in metrics)
    if truncated:
        text += '{"epoch": %d, "stage": 0, "lr": 0.1, "train_lo' % (len(metrics) + 1)
    (rd / "metrics.jsonl").write_text(text)
    if state == "done":
        (rd / "final.json").write_text(json.dumps(
            {"status": "done", "best_top1": best, "last_top1": last, "best_top5": 99.9, "last_top5": 99.8,
             "best_epoch": epochs - 1, "epochs": epochs, "wall_s": wall_s, "device": device,
             "gpu_name": gpu_name, "world_size": 1, "gpu_hours": gpu_hours, "config_hash": h}))
    elif state == "failed":
        (rd / "failed.json").write_text(json.dumps({"reason": "NaN loss", "epoch": len(metrics)}))
    elif state == "running":
        from effdstl_cli.files import boot_id, proc_start

        # held by this live process, as a lock is written now (pid, this boot, the pid's start time)
        (rd / "lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": time.time(),
                                             "boot_id": boot_id(), "pid_start": proc_start(os.getpid())}))
    return rd


SUBSET_EFFECT = {"reg_cor": 0.25, "reg": 0.15, "correct": 0.05, "not_correct": -0.1, "all": 0.0}
SCHEME_EFFECT = {"full": 0.75, "confidence": 0.74, "partial": 0.1}


def make_study(root: Path, name: str = "fig5-digits", seeds=range(5), triplets=(("mlp:16", "mlp:256-256", "mlp:32"),),
               schemes=("full", "partial", "confidence"), subsets=tuple(SUBSET_EFFECT), lo=90.7, hi=97.5,
               kind: str = "replacement", params=(None,)) -> Path:
    """A realistic finished Fig. 5 (or Fig. 6, kind='manipulation') study: baselines + altered runs."""
    rng = np.random.default_rng(0)
    sd = root / name
    for weak, strong, student in triplets:
        common = dict(study_kind=kind, weak=weak, strong=strong, student=student)
        for seed in seeds:
            make_run(sd, best=lo + rng.normal(0, 0.4), distiller="kd", baseline="weak", seed=seed,
                     label="weak teacher only", **common)
            make_run(sd, best=hi + rng.normal(0, 0.1), distiller="kd", baseline="strong", seed=seed,
                     label="strong teacher only", **common)
            for scheme in schemes:
                for subset in subsets:
                    for p in params:
                        f = SCHEME_EFFECT.get(scheme, 0.4) * (1 + SUBSET_EFFECT[subset]) + rng.normal(0, 0.05)
                        make_run(sd, best=lo + f * (hi - lo), seed=seed, scheme=scheme, subset=subset, param=p,
                                 distiller="replace" if kind == "replacement" else "manipulate",
                                 label=f"{scheme} / {subset}", **common)
    return sd


# -- normalization -----------------------------------------------------------------------------

def _table(rows):
    base = {"state": "done", "role": "student", "study": "s", "triplet": "w|s|st", "baseline": "",
            "best_top1": np.nan, "distiller": "replace", "scheme": "full", "subset": "all", "seed": 0}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_normalized_known_numbers_and_seed_mean():
    df = _table([
        {"baseline": "weak", "best_top1": 89.0, "seed": 0}, {"baseline": "weak", "best_top1": 89.0, "seed": 1},
        {"baseline": "weak", "best_top1": 92.0, "seed": 2},  # mean 90 (the median would be 89)
        {"baseline": "strong", "best_top1": 97.0, "seed": 0}, {"baseline": "strong", "best_top1": 99.0, "seed": 1},
        {"best_top1": 94.0, "seed": 0}, {"best_top1": 98.0, "seed": 1}, {"best_top1": 90.0, "seed": 2},
        {"best_top1": 50.0, "state": "failed"},                 # not done: dropped
        {"best_top1": 50.0, "role": "teacher", "triplet": ""},   # a teacher: not an altered run
    ])
    out = normalized(df, metric="best_top1")   # by name; the default is the final epoch
    assert len(out) == 3
    assert (out["acc_minus"] == 90.0).all() and (out["acc_plus"] == 98.0).all()
    assert (out["n_minus"] == 3).all() and (out["n_plus"] == 2).all()
    assert out.sort_values("seed")["norm"].tolist() == pytest.approx([0.5, 1.0, 0.0])


def test_normalized_last_top1_metric_and_per_triplet():
    df = _table([
        {"baseline": "weak", "best_top1": 80.0, "last_top1": 70.0},
        {"baseline": "strong", "best_top1": 90.0, "last_top1": 80.0},
        {"best_top1": 85.0, "last_top1": 78.0},
        {"triplet": "a|b|c", "baseline": "weak", "best_top1": 10.0, "last_top1": 10.0},
        {"triplet": "a|b|c", "baseline": "strong", "best_top1": 30.0, "last_top1": 30.0},
        {"triplet": "a|b|c", "best_top1": 15.0, "last_top1": 15.0},
    ])
    out = normalized(df, metric="last_top1").set_index("triplet")
    assert out.loc["w|s|st", "norm"] == pytest.approx(0.8)
    assert out.loc["a|b|c", "norm"] == pytest.approx(0.25)
    assert normalized(df, metric="best_top1").set_index("triplet").loc["w|s|st", "norm"] == pytest.approx(0.5)
    # the default is the final epoch's accuracy
    assert normalized(df).set_index("triplet").loc["w|s|st", "norm"] == pytest.approx(0.8)


def test_normalized_missing_baseline_names_triplet():
    df = _table([{"baseline": "weak", "best_top1": 90.0}, {"baseline": "strong", "best_top1": 98.0,
                                                           "state": "running"},
                 {"best_top1": 94.0}])
    with pytest.raises(EffdstlError, match=r"no strong-teacher baseline run for triplet w\|s\|st in study s"):
        normalized(df, metric="best_top1")
    with pytest.raises(EffdstlError, match="weak-teacher baseline"):
        normalized(_table([{"baseline": "strong", "best_top1": 98.0}, {"best_top1": 94.0}]), metric="best_top1")


def test_normalized_equal_baselines_error():
    df = _table([{"baseline": "weak", "best_top1": 90.0}, {"baseline": "strong", "best_top1": 90.0},
                 {"best_top1": 94.0}])
    with pytest.raises(EffdstlError, match="cannot normalize triplet w\\|s\\|st"):
        normalized(df, metric="best_top1")


def test_normalized_unknown_metric():
    with pytest.raises(EffdstlError, match="unknown metric"):
        normalized(_table([{"best_top1": 1.0}]), metric="top7")


# -- summaries ---------------------------------------------------------------------------------

def test_t_table_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 4, 9, 29, 30, 35, 50, 100, 500):
        assert t975(dof) == pytest.approx(stats.t.ppf(0.975, dof), abs=2e-3), dof
    assert math.isnan(t975(0))


def test_summarize_interval():
    df = pd.DataFrame({"g": ["a"] * 4 + ["b"], "norm": [0.0, 1.0, 2.0, 3.0, 7.0]})
    s = summarize(df, "g").set_index("g")
    assert s.loc["a", "mean"] == pytest.approx(1.5)
    assert s.loc["a", "std"] == pytest.approx(np.std([0, 1, 2, 3], ddof=1))
    assert s.loc["a", "n"] == 4
    half = 3.182 * s.loc["a", "std"] / 2
    assert s.loc["a", "ci_low"] == pytest.approx(1.5 - half) and s.loc["a", "ci_high"] == pytest.approx(1.5 + half)
    assert s.loc["b", "n"] == 1 and math.isnan(s.loc["b", "ci95"]) and s.loc["b", "mean"] == 7.0
    assert interval95([]) [2] == 0
    with pytest.raises(EffdstlError, match="no column"):
        summarize(df, "nope")


# -- collect -----------------------------------------------------------------------------------

def test_collect_states_columns_and_truncated_metrics(tmp_path):
    sd = tmp_path / "st"
    done = make_run(sd, best=95.5, seed=0, subset="reg")
    failed = make_run(sd, state="failed", seed=1)
    partial = make_run(sd, state="partial", epochs=6, seed=2, truncated=True)
    pending = make_run(sd, state="pending", seed=3)
    running = make_run(sd, state="running", epochs=6, seed=4)
    stale = make_run(sd, state="partial", epochs=6, seed=5)
    (stale / "lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": os.uname().nodename, "started": 0}))
    (sd / "runs" / "notarun").mkdir()  # no config.yaml: ignored
    df = collect(sd).set_index("run")
    assert len(df) == 6
    for c in ("run", "state", "role", *META_KEYS, "best_top1", "last_top1", "best_top5", "last_top5",
              "best_epoch", "epochs", "wall_s", "gpu_hours", "device", "gpu_name", "world_size", "epochs_done"):
        assert c in df.reset_index().columns, c
    assert df.loc[done.name, "state"] == "done"
    assert df.loc[failed.name, "state"] == "failed" and df.loc[failed.name, "fail_reason"] == "NaN loss"
    assert df.loc[partial.name, "state"] == "partial"
    assert df.loc[partial.name, "epochs_done"] == 3  # the truncated 4th line is skipped
    assert df.loc[pending.name, "state"] == "pending" and df.loc[pending.name, "epochs_done"] == 0
    assert df.loc[running.name, "state"] == "running"
    assert df.loc[stale.name, "state"] == "partial"  # dead pid on this host: not running
    assert df.loc[done.name, "best_top1"] == 95.5 and df.loc[done.name, "epochs_done"] == 4
    assert df.loc[done.name, "subset"] == "reg" and df.loc[done.name, "triplet"] == "mlp:16|mlp:256-256|mlp:32"
    assert df.loc[done.name, "device"] == "cpu" and df.loc[done.name, "world_size"] == 1
    assert math.isnan(df.loc[failed.name, "best_top1"])


def test_collect_missing_dirs(tmp_path):
    with pytest.raises(EffdstlError, match=str(tmp_path / "nope")):
        collect(tmp_path / "nope")
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    with pytest.raises(EffdstlError, match="no runs under"):
        collect(tmp_path / "empty")


def test_collect_bad_config_is_one_line_error(tmp_path):
    rd = make_run(tmp_path / "s")
    (rd / "config.yaml").write_text("role: [unclosed\n")
    with pytest.raises(EffdstlError, match="cannot read .*config.yaml"):
        collect(tmp_path / "s")


def test_write_table_atomic_roundtrip(tmp_path):
    sd = make_study(tmp_path, seeds=range(2), schemes=("full",), subsets=("reg", "all"))
    df = collect(sd)
    paths = write_table(df, tmp_path / "out")
    assert [p.name for p in paths] == ["results.csv", "results.parquet"]
    back = pd.read_parquet(paths[1])
    assert len(back) == len(df) == 2 * (2 + 2) and list(back.columns) == list(df.columns)
    assert len(pd.read_csv(paths[0])) == len(df)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_collect_then_normalize_realistic_study(tmp_path):
    sd = make_study(tmp_path, seeds=range(3))
    norm = normalized(collect(sd))
    assert len(norm) == 3 * 3 * 5
    s = summarize(norm, ["scheme"]).set_index("scheme")
    assert s.loc["full", "mean"] > s.loc["partial", "mean"] + 0.3


def test_collect_keeps_the_study_as_it_is_now(tmp_path):
    """A run folder the study no longer plans (left from an older study file) is left out, and a
    reused run (same config, so same hash) takes the study's current label."""
    from effdstl_cli.config import load_study
    from effdstl_cli.studies import plan

    root = Path(__file__).resolve().parents[1]
    study = load_study(root / "studies" / "figure8-digits.yaml")
    p = plan(study, tmp_path)
    cfg, rd = next((c, d) for j in p.jobs for c, d in j.runs if c["role"] == "student")
    rd.mkdir(parents=True)
    old = {**cfg, "meta": {**cfg["meta"], "label": "an old label"}}
    (rd / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    stale = make_run(p.study_dir, label="stale", study_kind="fig8")
    stale = stale.rename(stale.parent / "0123456789ab")  # named like a hash, as a launch names every run
    (p.study_dir / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    df = collect(p.study_dir)
    assert list(df["run"]) == [rd.name] and df.attrs["stale"] == 1
    assert df["label"].iloc[0] == cfg["meta"]["label"] != "an old label"
    every = collect(p.study_dir, stale=True)
    assert set(every["run"]) == {rd.name, stale.name} and "an old label" in set(every["label"])
    hand = make_run(p.study_dir, label="by hand", study_kind="fig8")  # not named like a hash: no identity
    assert set(collect(p.study_dir)["run"]) == {rd.name, hand.name}   # to compare, so it always counts
    stale.rename(stale.parent / "fedcba987654")
    hand.rename(hand.parent / "abcdefabcdef")
    rd.rename(rd.parent / "a1b2c3d4e5f6")     # a study file that plans none of the folders now
    with pytest.raises(EffdstlError, match="none of the 3 runs under .* belongs to the study as it is now"):
        collect(p.study_dir)
