"""Issue 13's tools: paired effect sizes (effects.py), training curves (plots.curves) and the
TensorBoard scalars every run writes (tblog.py), on hand-made runs and on a real digits study."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_env
from test_results import make_run

from effdstl_cli import effects, plots
from effdstl_cli.errors import EffdstlError
from effdstl_cli.results import collect, t975

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "effdstl_cli.cli"]


def _study(tmp_path, table: dict[str, list[float]], kind: str = "recipe", **meta) -> Path:
    """One run per (label, seed) with the given best_top1, all of one unit."""
    sd = tmp_path / "s"
    for label, accs in table.items():
        for seed, acc in enumerate(accs):
            teacherless = label == "no distill"     # its triplet names no teacher, as studies.py writes it
            make_run(sd, study_kind=kind, label=label, seed=seed, best=acc, distiller=label.lower().replace(" ", "_"),
                     **({"triplet": "||mlp:32"} if teacherless else {}), **meta)
    return sd


# -- effects: hand-computed cases and properties ------------------------------------------------

def test_paired_difference_is_the_mean_of_per_seed_differences_with_a_t_interval(tmp_path):
    sd = _study(tmp_path, {"no distill": [40.0, 42.0, 44.0], "KD": [41.0, 44.0, 45.5]})
    eff = effects.paired_effects(collect(sd))
    (row,) = eff.to_dict("records")
    d = np.array([1.0, 2.0, 1.5])                    # per-seed differences
    half = t975(2) * d.std(ddof=1) / math.sqrt(3)
    assert row["label"] == "KD" and row["anchor"] == "no distill" and row["n"] == 3
    assert row["diff"] == pytest.approx(1.5) and row["ci95"] == pytest.approx(half)
    assert row["ci_low"] == pytest.approx(1.5 - half) and row["verdict"] == "higher"
    # the final epoch's accuracy (make_run: last = best - 0.2)
    assert row["acc"] == pytest.approx(np.mean([41.0, 44.0, 45.5]) - 0.2) and row["acc_anchor"] == pytest.approx(41.8)


def test_pairing_removes_the_seed_effect_that_two_means_would_carry(tmp_path):
    # seeds differ by 4 points, the configuration adds exactly 0.3 on every seed
    base = [40.0, 44.0, 48.0, 52.0, 56.0]
    sd = _study(tmp_path, {"no distill": base, "KD": [b + 0.3 for b in base]})
    (row,) = effects.paired_effects(collect(sd)).to_dict("records")
    assert row["diff"] == pytest.approx(0.3) and row["ci95"] == pytest.approx(0.0, abs=1e-9)
    # unpaired, the two intervals would overlap almost entirely; paired, the runs differ by exactly
    # 0.3 on every seed: an interval of zero width, which the rules do not grade
    assert row["verdict"].startswith("not measurable here (zero-width")


def test_only_seeds_both_finished_are_paired_and_a_lower_result_says_lower(tmp_path):
    sd = _study(tmp_path, {"no distill": [50.0, 50.0, 50.0, 50.0], "RKD": [49.0, 48.9, 49.1]})
    make_run(sd, study_kind="recipe", label="RKD", seed=3, state="failed", distiller="rkd")
    (row,) = effects.paired_effects(collect(sd)).to_dict("records")
    assert row["n"] == 3 and row["diff"] == pytest.approx(-1.0) and row["verdict"] == "lower"


def test_an_interval_across_zero_is_no_clear_difference_and_one_pair_has_no_interval(tmp_path):
    sd = _study(tmp_path, {"no distill": [50.0, 50.0, 50.0], "WSL": [51.0, 49.0, 50.5]})
    (row,) = effects.paired_effects(collect(sd)).to_dict("records")
    assert row["verdict"] == "no clear difference" and row["ci_low"] < 0 < row["ci_high"]
    sd2 = _study(tmp_path / "b", {"no distill": [50.0], "WSL": [51.0]})
    (one,) = effects.paired_effects(collect(sd2)).to_dict("records")
    assert one["n"] == 1 and math.isnan(one["ci95"]) and one["verdict"] == "not measurable here (n=1 < 3 seeds)"
    assert effects.effect_text(one) == "+1.00 (n=1)"


def test_any_label_can_be_the_anchor_and_units_are_never_mixed(tmp_path):
    sd = tmp_path / "s"
    for pair, shift in (("A->B", 0.0), ("C->D", 10.0)):
        for seed in range(3):
            for label, acc in (("no distill", 50.0), ("WSL", 52.0), ("EffDstl", 53.0 + seed * 0.1)):
                make_run(sd, study_kind="recipe", label=label, seed=seed, best=acc + shift, pair=pair,
                         distiller=label.lower())
    eff = effects.paired_effects(collect(sd), anchor="WSL")
    assert set(eff["label"]) == {"no distill", "EffDstl"} and len(eff) == 4      # per pair, never across
    e = eff[eff["label"] == "EffDstl"].set_index("pair")
    assert e.loc["A->B", "diff"] == pytest.approx(1.1) and e.loc["C->D", "diff"] == pytest.approx(1.1)
    with pytest.raises(EffdstlError, match="anchor 'KD': no finished run has that label; labels: EffDstl, WSL"):
        effects.paired_effects(collect(sd), anchor="KD")


def test_the_default_anchor_follows_the_study_kind(tmp_path):
    sd = _study(tmp_path, {"weak teacher only": [90.0, 91.0], "full / reg": [93.0, 93.5]}, kind="replacement",
                baseline="")
    eff = effects.paired_effects(collect(sd))
    assert list(eff["anchor"]) == ["weak teacher only"] and eff["diff"].iloc[0] == pytest.approx(2.75)
    with pytest.raises(EffdstlError, match="--anchor LABEL"):
        effects.default_anchor(pd.DataFrame({"study_kind": ["mystery"]}))


# -- curves --------------------------------------------------------------------------------------

def test_curves_one_line_per_label_mean_over_seeds(tmp_path):
    sd = tmp_path / "s"
    for seed in range(2):
        for label, off in (("KD", 0.0), ("no distill", -5.0)):
            ms = [{"epoch": e, "stage": 0, "lr": 0.1, "train_loss": 2.0 / e, "train_top1": 50 + e + off,
                   "test_loss": 2.5 / e, "test_top1": 45 + e + off + seed, "test_top5": 99.0, "epoch_s": 1.0}
                  for e in range(1, 6)]
            make_run(sd, study_kind="recipe", label=label, seed=seed, metrics=ms, epochs=5, distiller="kd")
    res = plots.curves(sd)
    assert [p.suffix for p in res] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in res)
    assert res.info["groups"] == ["KD", "no distill"] and res.info["runs"] == {"KD": 2, "no distill": 2}
    va = res.figure.axes[1]
    kd = [ln for ln in va.get_lines() if ln.get_linestyle() == "-"][0].get_ydata()
    assert list(kd) == pytest.approx([45 + e + 0.5 for e in range(1, 6)])     # mean of seeds 0 and 1
    one = plots.curves(sd, ["no distill"], stem="one")
    assert one.info["groups"] == ["no distill"]
    with pytest.raises(EffdstlError, match="unknown label .* 'KDD'"):
        plots.curves(sd, ["KDD"])


# -- on a real (tiny) digits study: TensorBoard, `plot curves`, `results` --------------------------

def _run(args: list, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    p = subprocess.run(CLI + [str(a) for a in args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def digits_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("findings")
    _run(["run", "--study", ROOT / "studies" / "figure5-digits.yaml", "--results", tmp / "r", "-x", "debug",
          "--device", "cpu", "--set", "seeds=[0,1,2]", "--set", "schedule.epochs=3",
          "--set", "grid.scheme=[full,partial,confidence]", "--set", "grid.subset=[reg,reg_cor]"], tmp)
    return tmp, tmp / "r" / "figure5-digits"


def test_every_run_writes_one_scalar_series_per_metric_for_tensorboard(digits_study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, sd = digits_study
    df = collect(sd)
    assert len(df) == 26 and set(df["state"]) == {"done"}    # 2 teachers + 3 seeds x (2 baselines + 3 x 2)
    seen = set()
    for _, r in df.iterrows():
        (logdir,) = (Path(r["run_dir"]) / "tb").iterdir()
        assert logdir.name.endswith(f"-seed{r['seed']}")    # TensorBoard names the run by its label
        seen.add(logdir.name)
        ea = EventAccumulator(str(logdir))
        ea.Reload()
        tags = ea.Tags()["scalars"]
        assert {"train/top1", "test/top1", "train/loss", "test/loss", "lr"} <= set(tags)
        epochs = int(r["epochs_done"])
        for tag in tags:
            assert [e.step for e in ea.Scalars(tag)] == list(range(1, epochs + 1)), (tag, logdir)
        last = ea.Scalars("test/top1")[-1].value
        metrics = [ln for ln in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines() if ln]
        assert last == pytest.approx(json.loads(metrics[-1])["test_top1"], rel=1e-6)
    assert len(seen) == 26  # labels and seeds make every TensorBoard run name unique in the study


def test_a_resumed_run_rewrites_its_events_without_repeating_an_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from effdstl_cli import tblog

    cfg = {"meta": {"label": "full / reg", "seed": 3}}
    rows = [{"epoch": e, "train_top1": 10.0 * e, "losses": {"kd": 1.0 / e}} for e in (1, 2, 3)]
    tblog.rewrite(tmp_path, cfg, rows[:2])
    tblog.append(tmp_path, cfg, rows[2])
    tblog.rewrite(tmp_path, cfg, rows[:2])       # resumed from epoch 2's checkpoint: epoch 3 is gone again
    tblog.append(tmp_path, cfg, rows[2])
    d = tblog.log_dir(tmp_path, cfg)
    assert d.name == "full-reg-seed3"
    ea = EventAccumulator(str(d))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/top1")] == [(1, 10.0), (2, 20.0), (3, 30.0)]
    assert [e.step for e in ea.Scalars("loss/kd")] == [1, 2, 3]


def test_plot_curves_and_results_effects_from_the_cli(digits_study):
    tmp, sd = digits_study
    p = _run(["plot", "curves", "figure5-digits", "--results", tmp / "r", "--runs", "weak teacher only",
              "--runs", "full / reg"], tmp)
    assert (sd / "figures" / "curves.png").stat().st_size > 10_000 and "curves.png" in p.stdout
    p = _run(["results", "figure5-digits", "--results", tmp / "r"], tmp)
    assert "paired differences to 'weak teacher only'" in p.stdout
    eff = pd.read_csv(sd / "tables" / "effects.csv")
    assert set(eff["label"]) == {"strong teacher only"} | {f"{a} / {b}" for a in ("full", "partial", "confidence")
                                                                for b in ("reg", "reg_cor")} and set(eff["n"]) == {3}
    bad = subprocess.run(CLI + ["plot", "curves", "figure5-digits", "--results", str(tmp / "r"), "--runs", "nope"],
                         cwd=tmp, env=cli_env(), capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr + bad.stdout
    assert "unknown label in study figure5-digits 'nope'" in bad.stdout + bad.stderr


def test_the_findings_report_from_a_real_study(digits_study, tmp_path, monkeypatch):
    """scripts/findings.py on a real (tiny) Fig. 5 digits study: the paper quoted, a verdict per
    claim reached by the stated rules on the final epoch, a forest plot, the study's elapsed time;
    studies that never ran say 'not measured' instead of failing the report."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("findings_script", ROOT / "scripts" / "findings.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "FIGDIR", tmp_path / "figs")        # the repo's docs/ stay untouched
    text = mod.build(digits_study[1].parent)
    row = next(ln for ln in text.splitlines() if ln.startswith("| Fig. 5 | figure5-digits | full ≈ confidence |"))
    verdict, minutes = row.split(" | ")[3], row.rstrip(" |").split(" | ")[-1]
    # one of the rules' outcomes (3 epochs of training may leave acc+ − acc- unmeasurable)
    assert verdict.startswith(("holds (", "undecided (", "does not hold (", "not measurable here")), verdict
    assert minutes == "< 0.1" or float(minutes) > 0
    assert "| Table 1 | table1-cifar10-1k | — | not measured | — |" in text
    assert "No CIFAR-10 study has run yet." in text
    assert mod.FIG5_QUOTE in text and text.count(effects.RULES) == 1       # quoted; the rules stated once
    assert "last_top1" in text and "CIFAR-100" not in text and "CPU cores" not in text
    assert (tmp_path / "figs" / "figure5-digits.png").stat().st_size > 0
    assert (tmp_path / "figs" / "forest-figure5-digits.png").stat().st_size > 0
    eff = pd.read_csv(tmp_path / "figs" / "effects-figure5-digits.csv")
    assert set(eff["metric"]) == {"last_top1"}


# -- the verdict rules (effects.RULES), on hand-made intervals --------------------------------------

def test_verdict_rules_on_hand_made_intervals():
    m = effects.MARGIN_NORM
    # ≈: both ends inside the margin; one end outside: undecided; excluding 0 and leaving it: different
    assert effects.equivalent(-0.5 * m, 0.9 * m, 5) == "A ≈ B"
    assert effects.equivalent(-0.5 * m, 1.5 * m, 5) == "undecided"
    assert effects.equivalent(0.5 * m, 1.5 * m, 5) == "different"
    assert effects.equivalent(-0.05, 0.05, 5, margin=0.01) == "undecided"      # the margin is a parameter
    # >: the interval excludes 0
    assert effects.greater(0.1, 0.9, 5) == "A > B" and effects.greater(-0.9, -0.1, 5) == "A < B"
    assert effects.greater(-0.1, 0.9, 5) == "no clear difference"
    # not measurable: a zero-width interval (identical runs), or fewer than 3 seeds
    assert effects.greater(0.0, 0.0, 5).startswith("not measurable here (zero-width")
    assert effects.equivalent(0.3, 0.3, 5).startswith("not measurable here (zero-width")
    assert effects.greater(0.5, 0.9, 2) == "not measurable here (n=2 < 3 seeds)"
    # best subset: only by an interval over the runner-up, else the tie is named
    means = {"reg_cor": 0.9, "reg": 0.85, "all": 0.2}
    assert effects.best_of(means, (0.01, 0.09, 5)) == ("best", "reg_cor")
    assert effects.best_of(means, (-0.02, 0.12, 5)) == ("tie", "reg_cor and reg")
    assert effects.best_of(means, (0.05, 0.05, 5))[0].startswith("not measurable here (zero-width")


def test_the_final_epoch_is_the_default_metric(tmp_path):
    # best-epoch numbers say KD helps; the final epochs (what the student ends as) say it does not
    sd = tmp_path / "s"
    for seed in range(3):
        make_run(sd, study_kind="recipe", label="no distill", seed=seed, best=50.0, last=50.0 + seed * 0.1,
                 distiller="none", triplet="||mlp:32")
        make_run(sd, study_kind="recipe", label="KD", seed=seed, best=52.0 + seed * 0.1, last=49.0, distiller="kd")
    (row,) = effects.paired_effects(collect(sd)).to_dict("records")
    assert row["metric"] == "last_top1" and row["verdict"] == "lower"
    (best,) = effects.paired_effects(collect(sd), metric="best_top1").to_dict("records")
    assert best["verdict"] == "higher"
    assert effects.metric_label("best_top1") == "best-epoch top-1 (chosen on the test set)"
    assert effects.metric_label("last_top5") == "last-epoch top-5"
