"""plots.py and tables.py on hand-made run directories (docs/RUNDIR.md layout)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from effdstl_cli import plots, tables
from effdstl_cli.errors import EffdstlError

# The run-directory builders live in test_results.py; load them by path so this works whether or
# not tests/ is a package.
_spec = importlib.util.spec_from_file_location("_effdstl_test_builders", Path(__file__).with_name("test_results.py"))
_b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_b)
make_run, make_study = _b.make_run, _b.make_study

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_files(result, stem):
    png, pdf = result.paths
    assert png.name == f"{stem}.png" and pdf.name == f"{stem}.pdf"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000
    assert not [p for p in png.parent.iterdir() if p.name.endswith(".tmp")]


# -- Fig. 5 / 6 ----------------------------------------------------------------------------------

def test_figure5_layout_and_files(tmp_path):
    sd = make_study(tmp_path, seeds=range(3))
    res = plots.figure5(sd)
    check_files(res, "figure5")
    assert res.paths[0].parent == sd / "figures"
    assert res.info["x_groups"] == ["full", "partial", "confidence"]
    assert res.info["groups"] == 3 * 5 and res.info["points"] == 3 * 5 * 3
    assert res.info["subsets"] == ["reg_cor", "reg", "correct", "not_correct", "all"]
    legend = res.figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["reg ∩ correct", "reg", "correct", "not correct", "all",
                                                          "mean ± 95% CI"]
    ax = res.figure.axes[0]
    assert ax.get_ylabel() == "normalized accuracy"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["full", "partial", "confidence"]
    hlines = sorted(round(l.get_ydata()[0], 6) for l in ax.get_lines() if l.get_linestyle() == "--")
    assert hlines == [0.0, 1.0]
    texts = {t.get_text() for t in ax.texts}
    assert {"weak teacher", "strong teacher"} <= texts
    # one scatter (PathCollection) per group, each with one point per seed
    sizes = [len(c.get_offsets()) for c in ax.collections if c.__class__.__name__ == "PathCollection"]
    assert sizes == [3] * 15
    assert "fig5-digits" in res.figure.get_suptitle() and "digits" in res.figure.get_suptitle()


def test_figure5_one_panel_per_triplet_and_out_dir(tmp_path):
    sd = make_study(tmp_path, seeds=range(2), subsets=("reg_cor", "all"),
                    triplets=(("mlp:16", "mlp:256-256", "mlp:32"), ("cnn:small", "resnet20", "cnn:tiny")))
    res = plots.figure5(sd, out_dir=tmp_path / "figs")
    check_files(res, "figure5")
    assert res.paths[0].parent == tmp_path / "figs"
    assert len(res.info["panels"]) == 2 and all(p["groups"] == 3 * 2 for p in res.info["panels"])
    visible = [a for a in res.figure.axes if a.get_visible()]
    assert len(visible) == 2
    assert any("cnn:small" in a.get_title() for a in visible) and any("mlp:16" in a.get_title() for a in visible)


def test_figure5_errors(tmp_path):
    sd = make_study(tmp_path, seeds=range(1), schemes=("full",), subsets=("all",))
    for rd in (sd / "runs").iterdir():  # drop the strong baseline
        if "baseline: strong" in (rd / "config.yaml").read_text():
            (rd / "final.json").unlink()
    with pytest.raises(EffdstlError, match="no strong-teacher baseline run for triplet mlp:16\\|mlp:256-256\\|mlp:32"):
        plots.figure5(sd)
    with pytest.raises(EffdstlError, match="no finished manipulation runs"):
        plots.figure6(sd)


def test_figure6_groups_by_kind_and_param(tmp_path):
    sd = make_study(tmp_path, "fig6", seeds=range(2), kind="manipulation", subsets=("reg_cor", "reg"),
                    schemes=("student_amp", "label_smoothing"), params=(0.1, 0.3))
    res = plots.figure6(sd)
    check_files(res, "figure6")
    assert res.info["x_groups"] == ["label smoothing\nt=0.1", "label smoothing\nt=0.3",
                                    "student amplification\nδ=0.1", "student amplification\nδ=0.3"]
    assert res.info["groups"] == 4 * 2 and res.info["points"] == 4 * 2 * 2
    assert res.figure.axes[0].get_xlabel() == "manipulation"


# -- Fig. 7 --------------------------------------------------------------------------------------

def _fgsm_table(path: Path, n=300, eps=(0.01, 0.03, 0.1), shift=0.2):
    rng = np.random.default_rng(0)
    rows = []
    for net in ("undistilled", "teacher", "student"):
        for sub, mu in (("kept", 0.1), ("manipulated", 0.1 + shift)):
            for e in eps:
                d = rng.normal(mu, 0.05, n)
                rows.append(pd.DataFrame({"network": net, "subset": sub, "sample": np.arange(n), "eps": e,
                                          "conf_clean": 0.9, "conf_adv": 0.9 - d, "drop": d, "run": "abc"}))
    path.parent.mkdir(parents=True)
    pd.concat(rows).to_parquet(path)


def test_figure7_panels_peaks_and_eps(tmp_path):
    sd = tmp_path / "fgsm-study"
    _fgsm_table(sd / "fgsm" / "abc" / "fgsm.parquet")
    res = plots.figure7(sd)
    check_files(res, "figure7")
    assert res.info["eps_rows"] == [0.01, 0.03, 0.1]  # several eps: one row each
    assert res.info["networks"] == ["teacher", "student", "undistilled"]
    axes = res.figure.axes
    assert len(axes) == 9 and axes[0].get_ylabel() == "density"
    assert axes[-1].get_xlabel() == "true-class confidence drop p(x)[y] - p(x_adv)[y]"
    for net in ("teacher", "student", "undistilled"):
        pk = res.info["peaks"][net]
        assert pk["kept"] == pytest.approx(0.1, abs=0.03) and pk["manipulated"] == pytest.approx(0.3, abs=0.03)
    # the two peaks are marked (dashed lines) and labelled with their values
    vlines = [l for l in axes[0].get_lines() if l.get_linestyle() == "--"]
    assert len(vlines) == 2
    assert len([t for t in axes[0].texts]) == 2
    assert "peak gap (manipulated − kept)" in axes[0].get_title()
    one = plots.figure7(sd, eps=0.1)
    assert one.info["eps"] == 0.1 and len(one.figure.axes) == 3
    with pytest.raises(EffdstlError, match="no FGSM rows at eps=0.5; eps present: 0.01, 0.03, 0.1"):
        plots.figure7(sd, eps=0.5)


def test_figure7_each_panel_has_its_own_scale(tmp_path):
    """A network whose drops are 100x smaller still gets a readable panel (not squashed)."""
    sd = tmp_path / "s"
    rng = np.random.default_rng(1)
    rows = []
    for net, scale in (("teacher", 1.0), ("undistilled", 0.01)):
        for sub, mu in (("kept", 0.2), ("manipulated", 0.4)):
            d = rng.normal(mu * scale, 0.05 * scale, 400)
            rows.append(pd.DataFrame({"network": net, "subset": sub, "sample": np.arange(400), "eps": 0.03,
                                      "conf_clean": 0.9, "conf_adv": 0.9 - d, "drop": d, "run": "r", "pool": 5000}))
    (sd / "fgsm" / "r").mkdir(parents=True)
    pd.concat(rows).to_parquet(sd / "fgsm" / "r" / "fgsm.parquet")
    res = plots.figure7(sd)
    (t_lo, t_hi), (u_lo, u_hi) = res.figure.axes[0].get_xlim(), res.figure.axes[1].get_xlim()
    assert (t_hi - t_lo) > 20 * (u_hi - u_lo)
    pk = res.info["peaks"]["undistilled"]
    assert pk["kept"] == pytest.approx(0.002, abs=0.0007) and pk["manipulated"] == pytest.approx(0.004, abs=0.0007)
    assert "drawn at random of 5000" in res.info["legend"][0]


def test_figure7_missing_tables(tmp_path):
    (tmp_path / "s" / "runs").mkdir(parents=True)
    with pytest.raises(EffdstlError, match="effdstl attack fgsm"):
        plots.figure7(tmp_path / "s")


def test_kde_integrates_to_one_and_peaks_at_mode():
    x = np.random.default_rng(0).normal(0.3, 0.1, 2000)
    grid = np.linspace(-0.5, 1.1, 801)
    y = plots.kde(x, grid)
    assert np.trapezoid(y, grid) == pytest.approx(1.0, abs=0.01)
    assert grid[np.argmax(y)] == pytest.approx(0.3, abs=0.03)
    assert np.all(np.isfinite(plots.kde(np.full(50, 0.2), grid)))  # zero spread: no NaN


# -- Fig. 8 --------------------------------------------------------------------------------------

def test_figure8_two_panels_mean_over_seeds(tmp_path):
    sd = tmp_path / "fig8"
    for seed in range(2):
        for sub, gain in (("reg_cor", 0.0), ("reg", 2.0)):
            ms = [{"epoch": e, "stage": int(e > 6), "lr": 0.1, "train_loss": 1.0, "train_top1": 60 + 3 * e + gain * (e > 6),
                   "test_loss": 1.0, "test_top1": 50 + 3 * e + seed - gain * (e > 6), "test_top5": 99.0, "epoch_s": 1.0}
                  for e in range(1, 9)]
            make_run(sd, study_kind="fig8", distiller="effdstl", subset=sub, seed=seed, metrics=ms, epochs=8,
                     label=sub, truncated=(seed == 1))
    make_run(sd, study_kind="fig8", distiller="effdstl", subset="reg", seed=9, state="pending")
    res = plots.figure8(sd)
    check_files(res, "figure8")
    assert res.info["groups"] == ["reg_cor", "reg"] and res.info["runs"] == {"reg_cor": 2, "reg": 2}
    assert res.info["legend"][0].startswith("CKM on reg ∩ correct (keep incorrect)")
    assert res.info["legend"][1].startswith("CKM on all reg (manipulate incorrect)")
    tr, va, gap = res.figure.axes
    assert "train accuracy" in tr.get_ylabel() and "validation accuracy" in va.get_ylabel()
    assert "gap" not in gap.get_ylabel() and "train − validation" in gap.get_ylabel()
    g = [l for l in gap.get_lines() if l.get_linestyle() == "-"][0].get_ydata()  # reg_cor: (60+3)-(50+3+0.5)
    assert g[0] == pytest.approx(9.5)
    solid = [l for l in va.get_lines() if l.get_linestyle() == "-"]
    assert len(solid) == 2
    y = solid[0].get_ydata()  # reg_cor validation mean over seeds 0 and 1 at epoch 1: 53.5
    assert y[0] == pytest.approx(53.5) and len(y) == 8
    assert any(l.get_linestyle() == ":" for l in va.get_lines())  # stage-2 start marked


def test_figure8_needs_runs(tmp_path):
    make_run(tmp_path / "s", subset="all")
    with pytest.raises(EffdstlError, match="reg_cor / reg"):
        plots.figure8(tmp_path / "s")


# -- tables --------------------------------------------------------------------------------------

def _recipe(sd, student="tv:resnet18", weak="tv:resnet34", strong="timm:resnet34d", dataset="imagenet:/data"):
    for seed in range(3):
        for m, acc in (("effdstl", 74.0), ("none", 72.0), ("kd", 72.5), ("rkd", 72.1), ("wsl", 73.0)):
            make_run(sd, study_kind="recipe", distiller=m, student=student, weak="" if m == "none" else weak,
                     strong=strong if m == "effdstl" else "", seed=seed, best=acc + seed, last=acc + seed - 0.5,
                     label=m, dataset=dataset, gpu_hours=2.0 if m == "effdstl" else 1.0, wall_s=3600.0,
                     group=f"group-s{seed}",
                     device="cuda", gpu_name="NVIDIA H100 80GB HBM3")
    make_run(sd, study_kind="recipe", distiller="kd", student=student, weak=weak, seed=7, state="failed",
             dataset=dataset)


def _check_written(paths, stem):
    assert [p.name for p in paths] == [f"{stem}.md", f"{stem}.csv", f"{stem}.tex"]
    for p in paths:
        assert p.stat().st_size > 100
    assert r"\begin{tabular}" in paths[2].read_text() and r"\toprule" in paths[2].read_text()
    return paths[0].read_text()


def test_table1_paper_pair(tmp_path):
    sd = tmp_path / "t1"
    _recipe(sd)
    df, paths = tables.table1(sd)
    md = _check_written(paths, "table1")
    assert paths[0].parent == sd / "tables"
    for c in ("student", "teacher", "method", "n", "best_top1_mean", "best_top1_std", "last_top1_mean",
              "last_top1_std", "paper_advanced", "paper_100ep", "note"):
        assert c in df.columns, c
    assert df["method"].tolist() == ["none", "kd", "rkd", "wsl", "effdstl"]
    e = df.set_index("method").loc["effdstl"]
    assert e["best_top1_mean"] == pytest.approx(75.0) and e["best_top1_std"] == pytest.approx(1.0)
    assert e["last_top1_mean"] == pytest.approx(74.5) and e["n"] == 3
    assert (e["paper_advanced"], e["paper_100ep"]) == (74.07, 72.17)
    assert df.set_index("method").loc["none", "paper_advanced"] == 72.30
    assert df.set_index("method").loc["kd", "n"] == 3  # the failed seed is not counted
    assert (df["note"] == "").all() and e["stage2_teacher"] == "timm:resnet34d"
    # the first number is the final epoch's; the paper's top-1 and top-5 (both columns) beside it
    assert "| EffDstl    | 74.50 ± 1.00 |" in md and "74.07" in md and "72.17" in md
    assert "91.54" in md and "90.95" in md and e["paper_top5_advanced"] == 91.54
    assert "top-1 only" not in md and "chosen on the test set" in md
    lines = [l for l in md.splitlines() if l.startswith("|")]
    assert len({len(l) for l in lines}) == 1  # padded: aligned in a terminal
    assert pd.read_csv(paths[1])["paper_advanced"].tolist() == [72.30, 72.90, 72.19, 73.44, 74.07]


def test_table1_mobilenet_pair_and_other_settings(tmp_path):
    _recipe(tmp_path / "mb", student="timm:mobilenetv1_100", weak="tv:resnet50", strong="timm:resnet50d")
    df, _ = tables.table1(tmp_path / "mb")
    assert df.set_index("method").loc["effdstl", "paper_advanced"] == 75.49
    assert df["paper_pair"].unique().tolist() == ["ResNet50->MobileNetV1"]
    _recipe(tmp_path / "dg", student="mlp:32", weak="mlp:16", strong="mlp:256-256", dataset="digits")
    df, paths = tables.table1(tmp_path / "dg", out_dir=tmp_path / "tabs")
    assert paths[0].parent == tmp_path / "tabs"
    assert df.set_index("method").loc["effdstl", "paper_advanced"] == 74.07  # reference column
    assert df["note"].str.contains("setting differs").all()
    assert "setting differs" in paths[0].read_text()
    assert tables.paper_pair("tv:resnet18", "timm:resnet34d") == "ResNet34->ResNet18"
    assert tables.paper_pair("mlp:32", "tv:resnet34") is None


def test_table3_cost(tmp_path):
    sd = tmp_path / "t1"
    _recipe(sd)
    make_run(sd, role="teacher", study_kind="teacher", distiller="none", student="tv:resnet34", weak="", strong="",
             gpu_hours=5.0, label="teacher weak", dataset="imagenet:/data")
    df, paths = tables.table3(sd)
    md = _check_written(paths, "table3")
    for c in ("method", "n", "gpu_hours_total", "gpu_hours_per_seed", "job_gpu_hours_per_seed", "wall_s_total",
              "device", "gpu_name", "paper_gpu_hours"):
        assert c in df.columns, c
    assert df["method"].tolist() == ["none", "kd", "rkd", "wsl", "effdstl", "teacher training"]
    e = df.set_index("method").loc["effdstl"]
    assert e["gpu_hours_total"] == pytest.approx(6.0) and e["gpu_hours_per_seed"] == pytest.approx(2.0)
    # each seed's five runs were one group job: 2 + 4 x 1 GPU-hours
    assert e["job_gpu_hours_per_seed"] == pytest.approx(6.0)
    assert e["paper_gpu_hours"] == 97.7 and e["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert math.isnan(df.set_index("method").loc["kd", "paper_gpu_hours"])
    assert df.set_index("method").loc["teacher training", "gpu_hours_total"] == 5.0
    assert "97.7 (RTX 3090; paper)" in md and "'share'" in md and "'job'" in md
    # the paper's Table 3 as printed: MEAL V2's rows with their "(+?)"
    assert "103.1 (+?)" in md and "110.2 (+?)" in md and "67.60" in md
    assert "README (not the paper)" in md


def test_table3_paper_hours_per_student(tmp_path):
    """Not one number for every row: each student gets the paper's own GPU-hours."""
    assert tables.paper_table3_hours("tv:resnet18") == (97.7, "ResNet18", "paper")
    assert tables.paper_table3_hours("timm:mobilenetv1_100") == (111.5, "MobileNet V1", "paper")
    # a number found only in the official README says so
    assert tables.paper_table3_hours("timm:resnet18d") == (114.0, "ResNet18d", "official README")
    assert tables.paper_table3_hours("timm:tf_mobilenetv3_small_075")[0] == 93.0
    assert tables.paper_table3_hours("timm:resnet18d")[0] == 114.0
    assert tables.paper_table3_hours("mlp:32") is None
    _recipe(tmp_path / "mb", student="timm:mobilenetv1_100", weak="tv:resnet50", strong="timm:resnet50d")
    df, _ = tables.table3(tmp_path / "mb")
    assert df.set_index("method").loc["effdstl", "paper_gpu_hours"] == 111.5


def test_table4_is_the_papers_table(tmp_path):
    """The paper's letters, rows and numbers beside ours: (c) the switch, (d) τ, (e) CKM; a row the
    paper reads against another gets both differences, ours seed-paired from the final epochs."""
    sd = tmp_path / "abl"
    ours = {"(c) switch, ResNet18": 74.0, "(d) tau 0.8, ResNet18": 73.5, "(c) no switch, MobileNet V1": 72.0,
            "(c) switch, MobileNet V1": 73.0, "(e) CKM off, ResNet34d": 75.0, "(e) CKM on, ResNet34d": 76.0}
    for seed in range(3):
        for lab, acc in ours.items():
            make_run(sd, study_kind="ablation", distiller="effdstl", label=lab, seed=seed, best=acc + 1.0,
                     last=acc + seed * 0.1 + (0.05 * seed if "on" in lab else 0.0), part=lab[1],
                     student="mlp:32", weak="mlp:64", strong="mlp:256-256", dataset="digits")
    df, paths = tables.table4(sd)
    md = _check_written(paths, "table4")
    for title in ("(a) teachers", "(b) continuing with MEAL V2", "(c) two-stage training: changing the teacher",
                  "(d) the stage-2 temperature τ", "(e) consistent knowledge mining"):
        assert title in md, title
    assert "not run" in md and "74.45 → 74.76" in md           # (b): the reason, and the paper's numbers
    r = df[df["part"] == "c"].set_index("label")
    assert r.loc["(c) switch, MobileNet V1", "paper_top1"] == 75.49
    assert r.loc["(c) switch, MobileNet V1", "paper_delta"] == pytest.approx(75.49 - 74.52)
    assert r.loc["(c) switch, MobileNet V1", "delta"] == pytest.approx(1.0)            # last epochs, paired
    e = df[df["part"] == "e"].set_index("label")
    assert e.loc["(e) CKM on, ResNet34d", "delta"] == pytest.approx(1.05)
    assert e.loc["(e) CKM on, ResNet34d", "paper_delta"] == pytest.approx(77.62 - 75.58)
    # (d)'s τ 0.7 is (c)'s row, listed again; rows the study did not run say so
    d = df[df["part"] == "d"]
    assert (d["label"] == "(c) switch, ResNet18").any() and not d.set_index("label").loc["(d) tau 1.0, MobileNet V1", "run"]
    assert "not run in this study" in md
    assert df[df["part"] == "a"]["paper_top1"].tolist() == [67.34, 66.63, 67.52, 67.18]
    assert "top-1 only" not in md


def test_table4_other_variants_against_the_first_row(tmp_path):
    sd = tmp_path / "abl"
    for seed in range(3):
        for lab, acc in (("mine A", 66.0), ("mine B", 67.0)):
            make_run(sd, study_kind="ablation", distiller="effdstl", label=lab, part="", seed=seed, best=acc,
                     last=acc + 0.1 * seed * (lab == "mine B"), student="mlp:16", weak="mlp:64", strong="mlp:128")
    df, paths = tables.table4(sd)
    md = paths[0].read_text()
    assert "other variants of this study" in md and "mlp:64 → mlp:128" in md
    assert df.set_index("label").loc["mine B", "delta"] == pytest.approx(1.1)


def test_tables_refuse_the_wrong_kind_of_study(tmp_path):
    """A sweep is not a Table 1, an ablation is not a Table 1 either; one line naming the kinds."""
    sweep = make_study(tmp_path, seeds=range(1), schemes=("full",), subsets=("all",))
    for which, fn, kinds in (("table1", tables.table1, "recipe"), ("table3", tables.table3, "recipe"),
                             ("table4", tables.table4, "ablation")):
        with pytest.raises(EffdstlError, match=rf"^{which} shows {kinds} studies; study .* is of kind replacement"):
            fn(sweep)
    abl = tmp_path / "abl"
    make_run(abl, study_kind="ablation", distiller="effdstl", label="tau 0.8")
    with pytest.raises(EffdstlError, match="table1 shows recipe studies; .* kind ablation .*table4"):
        tables.table1(abl)


def test_table1_rows_are_keyed_by_label(tmp_path):
    """Two runs of one distiller with different labels stay two rows."""
    sd = tmp_path / "t1"
    for seed in range(2):
        for lab, acc in (("KD", 72.0), ("KD tau 4", 73.0), ("EffDstl", 74.0)):
            make_run(sd, study_kind="recipe", distiller="effdstl" if lab == "EffDstl" else "kd", label=lab,
                     seed=seed, best=acc, student="tv:resnet18", weak="tv:resnet34", dataset="imagenet:/d")
    df, _ = tables.table1(sd)
    assert df["label"].tolist() == ["KD", "KD tau 4", "EffDstl"]
    assert df.set_index("label")["best_top1_mean"].to_dict() == {"KD": 72.0, "KD tau 4": 73.0, "EffDstl": 74.0}


def test_tables_need_finished_runs(tmp_path):
    make_run(tmp_path / "s", state="pending", distiller="effdstl", study_kind="recipe")
    make_run(tmp_path / "a", state="pending", distiller="effdstl", study_kind="ablation")
    for fn, d in ((tables.table1, "s"), (tables.table4, "a")):
        with pytest.raises(EffdstlError, match="no finished student runs"):
            fn(tmp_path / d)
    with pytest.raises(EffdstlError, match="no finished runs"):
        tables.table3(tmp_path / "s")


def test_figure_result_is_a_list_of_paths(tmp_path):
    sd = make_study(tmp_path, seeds=range(2), schemes=("full",), subsets=("all",))
    res = plots.figure5(sd)
    assert isinstance(res, list) and [p.suffix for p in res] == [".png", ".pdf"]
    assert res.paths == list(res) and res.figure.axes and "figure5.png" in repr(res)


def test_forest_draws_every_comparison_with_its_interval_and_the_margin(tmp_path):
    rows = [{"label": "full − confidence", "diff": 0.01, "ci_low": -0.03, "ci_high": 0.05, "verdict": "A ≈ B",
             "margin": 0.1},
            {"label": "KD − no distill", "diff": 0.5, "ci_low": float("nan"), "ci_high": float("nan"),
             "verdict": "not measurable here (n=1 < 3 seeds)"}]
    res = plots.forest(rows, tmp_path, "forest-x", "a study", "normalized accuracy", margin=0.1)
    assert [p.name for p in res] == ["forest-x.png", "forest-x.pdf"] and res[0].stat().st_size > 0
    assert res.info["labels"] == ["full − confidence", "KD − no distill"] and res.info["margin"] == 0.1
    ax = res.figure.axes[0]
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert "full − confidence  [A ≈ B]" in ticks
    assert len(ax.collections) == 1          # the margin shaded on the row judged by equivalence only
    with pytest.raises(EffdstlError, match="no comparisons"):
        plots.forest([], tmp_path, "forest-y", "t", "u")
