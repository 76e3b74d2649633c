#!/usr/bin/env python
"""Regenerate docs/FINDINGS.md: every small-data study, its figure or table, and the numbers the
report quotes, with a verdict per claim of the paper that follows from the measured intervals.

    make findings                                  # runs what is not done yet, then writes the report
    make findings DATASET=npz:data/cifar10.npz     # the CIFAR-10 studies on a local copy
    python scripts/findings.py --no-run            # the report from the runs already there

Every number in docs/FINDINGS.md is written here from the run directories (nothing is typed by
hand), so re-running this script on the same runs gives the same report. A run's identity is its
config hash: studies that are already done are not trained again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effdstl_cli import effects, plots, tables  # noqa: E402
from effdstl_cli.effects import paired_difference, paired_effects  # noqa: E402
from effdstl_cli.errors import EffdstlError  # noqa: E402
from effdstl_cli.results import collect, interval95, normalized  # noqa: E402
from effdstl_cli.rundir import RunDir  # noqa: E402
from effdstl_cli.targets import MANIPULATIONS, SCHEMES, SUBSETS  # noqa: E402

DATASETS = {"digits": "scikit-learn digits (1078 train / 719 test, 8x8)",
            "cifar10-1k": "CIFAR-10, 1000 train images per class (stratified, seeded), full 10k test set"}
KINDS = ("figure5", "figure6", "figure7", "figure8", "table1", "table4")
DOC, FIGDIR = ROOT / "docs" / "FINDINGS.md", ROOT / "docs" / "findings"


# -- running ------------------------------------------------------------------------------------

def run_study(study: str, results: Path, dataset: str | None) -> None:
    """``effdstl run`` the study (the CIFAR-10 ones with ``--set dataset=...`` when given)."""
    verb = ["attack", "fgsm"] if study.startswith("figure7") else ["run"]   # Fig. 7: training, then the probes
    cmd = [sys.executable, "-m", "effdstl_cli.cli", *verb, "--study", str(ROOT / "studies" / f"{study}.yaml"),
           "--results", str(results)]
    if dataset and not study.endswith("-digits"):
        cmd += ["--set", f"dataset={dataset}"]
    print(f"findings: effdstl {' '.join(cmd[3:])}", flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode:
        raise SystemExit(f"findings: study {study} did not finish; run the same command again to resume")


# -- numbers ------------------------------------------------------------------------------------

M = effects.METRIC   # the final epoch's top-1: the number of every comparison below


def ci(values) -> tuple[float, float, int]:
    mean, _, n, half = interval95(values)
    return mean, half, n


def fmt(mean: float, half: float, n: int | None = None, nd: int = 2, sign: bool = False) -> str:
    s = f"{mean:+.{nd}f}" if sign else f"{mean:.{nd}f}"
    if half == half:
        s += f" ± {half:.{nd}f}"
    return s + (f" (n={n})" if n is not None else "")


def students(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["state"] == "done") & (df["role"] == "student")]


def per_seed(df: pd.DataFrame, label: str, metric: str = M, **where) -> dict[int, float]:
    st = students(df)
    for k, v in where.items():
        st = st[st[k] == v]
    g = st[st["label"] == label]
    return {int(sd): float(x) for sd, x in zip(g["seed"], g[metric]) if x == x}


class Cmp(dict):
    """One comparison A − B: the seed-paired difference (``scale``: divided by it, e.g. the gap
    acc+ − acc- for normalized units), its interval, and the verdict of one rule of effects.RULES."""

    def text(self, nd: int = 2) -> str:
        if self["n"] == 0:
            return "no paired seeds"
        if self["ci_low"] != self["ci_low"]:
            return f"{self['diff']:+.{nd}f} (n={self['n']})"
        return f"{self['diff']:+.{nd}f} [{self['ci_low']:+.{nd}f}, {self['ci_high']:+.{nd}f}] (n={self['n']})"


def compare(a: dict[int, float], b: dict[int, float], label: str, rule: str = ">", scale: float = 1.0,
            margin: float | None = None) -> Cmp:
    """``rule``: '>' (effects.greater) or '≈' (effects.equivalent with ``margin``)."""
    d = paired_difference(a, b)
    lo, hi, mean = d["ci_low"] / scale, d["ci_high"] / scale, d["diff"] / scale
    n = int(d["n"])
    v = (effects.greater(lo, hi, n) if rule == ">" else effects.equivalent(lo, hi, n, margin or effects.MARGIN_NORM))
    return Cmp(label=label, diff=mean, ci_low=lo, ci_high=hi, n=n, verdict=v,
               **({"margin": margin or effects.MARGIN_NORM} if rule == "≈" else {}))


def teachers_line(df: pd.DataFrame) -> str:
    t = df[(df["role"] == "teacher") & (df["state"] == "done")].sort_values("last_top1")
    parts = [f"{r['label'].removeprefix('teacher ')} {r['student']} {r['last_top1']:.2f} %" for _, r in t.iterrows()]
    return "teachers (test top-1 at their last epoch): " + ", ".join(parts)


def scale_line(df: pd.DataFrame) -> str:
    """What trained: students, epochs and seeds, read from the runs."""
    st = students(df)
    models = ", ".join(sorted(set(st["student"])))
    ep = sorted({int(e) for e in st["epochs"].dropna()})
    seeds = sorted({int(x) for x in st["seed"].dropna()})
    return (f"students {models}; {ep[0] if len(ep) == 1 else f'{ep[0]}-{ep[-1]}'} epochs; seeds "
            f"{', '.join(map(str, seeds))} ({len(seeds)}); {len(st)} finished student runs")


def copy_fig(res, name: str) -> str:
    FIGDIR.mkdir(parents=True, exist_ok=True)
    png = Path(res[0])
    dst = FIGDIR / f"{name}.png"
    if png.resolve() != dst.resolve():
        shutil.copyfile(png, dst)
    return f"![{name}](findings/{dst.name})"


def forest(name: str, rows: list[Cmp], title: str, unit: str, margin: float | None = None) -> str:
    rows = [r for r in rows if r["n"]]
    if not rows:
        return ""
    plots.forest(rows, FIGDIR, f"forest-{name}", title, unit, margin)
    return f"![forest-{name}](findings/forest-{name}.png)"


def last_metric(run_dir: str, key: str) -> float:
    rows = RunDir(run_dir).metrics
    return float(rows[-1][key]) if rows and key in rows[-1] else float("nan")


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def cmp_table(rows: list[Cmp], unit: str) -> str:
    return md_table(["comparison", f"difference ({unit}), 95 % interval", "verdict"],
                    [[r["label"], r.text(), f"**{r['verdict']}**"] for r in rows])


def quote(text: str) -> str:
    return "> " + text


# -- normalized accuracy: the anchors and their gap ---------------------------------------------

def anchors(df: pd.DataFrame) -> tuple[str, float, Cmp]:
    """acc-, acc+ (mean ± half-width), the gap acc+ − acc- (its paired interval: the teachers must
    give students that differ, else nothing here is measurable) and the text."""
    lo, hi = per_seed(df, "weak teacher only"), per_seed(df, "strong teacher only")
    m_lo, h_lo, n = ci(lo.values())
    m_hi, h_hi, _ = ci(hi.values())
    gap = compare(hi, lo, "strong teacher only − weak teacher only")
    text = (f"acc- (student of the weak teacher) {fmt(m_lo, h_lo)} %, acc+ (of the strong one) {fmt(m_hi, h_hi)} % "
            f"(n={n}); acc+ − acc- {gap.text()} points: **{gap['verdict']}**")
    return text, m_hi - m_lo, gap


def norm_table(df: pd.DataFrame, col: str, order: tuple) -> tuple[str, pd.DataFrame]:
    norm = normalized(df, metric=M)
    cells = {k: ci(v) for k, v in norm.groupby([col, "subset"])["norm"]}
    cols = [c for c in order if any(k[0] == c for k in cells)]
    subs = [x for x in SUBSETS if any(k[1] == x for k in cells)]
    rows = [[x] + [fmt(*cells[(c, x)][:2]) if (c, x) in cells else "" for c in cols] for x in subs]
    means = pd.DataFrame([{col: c, "subset": x, "mean": cells[(c, x)][0]} for c, x in cells])
    return md_table(["subset", *cols], rows), means


def not_measurable_note(gap: Cmp) -> str | None:
    if gap["verdict"].startswith("not measurable"):
        return f"{gap['verdict']} (acc+ − acc-)"
    if gap["verdict"] != "A > B":
        return (f"not measurable here: the strong teacher's students do not beat the weak teacher's by an "
                f"interval ({gap['verdict']})")
    return None


def best_subset(df: pd.DataFrame, means: pd.DataFrame, col: str, name: str, label_of) -> tuple[str, str, Cmp | None]:
    """The best subset (not 'all') of ``name`` by the rules: beats the runner-up by an interval, else a tie."""
    m = means[(means[col] == name) & (means["subset"] != "all")].sort_values("mean", ascending=False)
    if len(m) < 2:
        return "not measurable here (fewer than two subsets)", "", None
    first, second = m["subset"].iloc[0], m["subset"].iloc[1]
    c = compare(per_seed(df, label_of(first)), per_seed(df, label_of(second)), f"{name}: {first} − {second}")
    v, who = effects.best_of(dict(zip(m["subset"], m["mean"])), (c["ci_low"], c["ci_high"], c["n"]))
    return v, who, c


# -- the sections --------------------------------------------------------------------------------

FIG5_QUOTE = ("First, full replacement and confidence replacement act similarly; Second, only replacing "
              "samples from the 'regularization&correct' subset leads to good results.")
FIG6_QUOTE = ("label smoothing outperforms the other two simple manipulations ... the label smoothing manipulation "
              "on the 'regularization&correct' subset achieves the best result, approximating the strong "
              "teacher-based distillation. In comparison, teacher amplification and student amplification cannot "
              "enhance the knowledge or even lead to worse results.")
FIG7_QUOTE = ("confidence in manipulated samples is less sensitive to adversarial examples ... when applying the "
              "attack on other networks (student and an undistilled MobileNet), the impact gap between the two "
              "sample subsets (peaks of the red and blue lines) becomes larger.")
FIG8_QUOTE = ("the gap between training accuracy and validation accuracy increases when incorrectly predicted "
              "training samples are not kept")


def section_fig5(name: str, df: pd.DataFrame, fig: str) -> tuple[str, list[list[str]]]:
    atext, gap_pts, gap = anchors(df)
    tab, means = norm_table(df, "scheme", tuple(SCHEMES))
    nm = not_measurable_note(gap)
    subs = [x for x in SUBSETS if (means["subset"] == x).any()]
    sim = [compare(per_seed(df, f"full / {x}"), per_seed(df, f"confidence / {x}"), f"full − confidence on {x}",
                   "≈", gap_pts) for x in subs]
    vs = [c["verdict"] for c in sim]
    k = {w: sum(v.startswith(w) for v in vs) for w in ("A ≈ B", "different", "undecided", "not measurable")}
    tally = ", ".join(f"{w} on {c} of {len(vs)} subsets" for w, c in k.items() if c)
    v1 = nm or (f"holds ({tally})" if k["A ≈ B"] and not k["different"] and not k["undecided"] else
                f"does not hold ({tally})" if k["different"] else f"undecided ({tally})")
    lines2, best_rows, v2s = [], [], []
    for scheme in ("full", "confidence"):
        v, who, c = best_subset(df, means, "scheme", scheme, lambda x, s=scheme: f"{s} / {x}")
        if c is not None:
            c = Cmp({**c, "diff": c["diff"] / gap_pts, "ci_low": c["ci_low"] / gap_pts, "ci_high": c["ci_high"] / gap_pts})
            best_rows.append(c)
        got = (f"the best subset is `{who}`" if v == "best" else f"a tie of {who}" if v == "tie" else v)
        ok = (v == "best" and who == "reg_cor")
        v2s.append("holds" if ok else "tie" if v == "tie" and "reg_cor" in who else "does not hold")
        lines2.append(f"  - {scheme} replacement: {got}" + (f" (best − runner-up {c.text()} normalized)" if c else ""))
    v2 = nm or ("holds" if all(x == "holds" for x in v2s) else
                "tie (reg ∩ correct shares the top)" if all(x in ("holds", "tie") for x in v2s) else "does not hold")
    rows = sim + [Cmp({**c, "label": f"best − runner-up: {c['label']}"}) for c in best_rows]
    fr = forest(name, rows, f"{name}: seed-paired differences in normalized accuracy", "normalized accuracy",
                effects.MARGIN_NORM)
    text = f"""### {name}

{scale_line(df)}. {teachers_line(df)}. {atext}.

Normalized accuracy of the final epochs (mean ± 95 % half-width over seeds; 0 = acc-, 1 = acc+):

{tab}

{fig}

1. *"full replacement and confidence replacement act similarly"* — **{v1}**. Per subset, full − confidence
   in normalized units (≈ needs the interval inside ±{effects.MARGIN_NORM:.2f}):

{cmp_table(sim, 'normalized')}

2. *"only replacing samples from the 'regularization&correct' subset leads to good results"* — **{v2}**:
{chr(10).join(lines2)}

{fr}
"""
    return text, [["Fig. 5", name, "full ≈ confidence", v1], ["Fig. 5", name, "reg ∩ correct the best subset", v2]]


def section_fig6(name: str, df: pd.DataFrame, fig: str) -> tuple[str, list[list[str]]]:
    atext, gap_pts, gap = anchors(df)
    tab, means = norm_table(df, "manipulation", tuple(MANIPULATIONS))
    nm = not_measurable_note(gap)
    st = students(df)

    def lab(kind: str, subset: str) -> str:
        labs = sorted(set(st[(st["manipulation"] == kind) & (st["subset"] == subset)]["label"]))
        return labs[0] if labs else ""

    kinds = [k for k in MANIPULATIONS if (means["manipulation"] == k).any()]
    ls = "label_smoothing"
    rc = {k: per_seed(df, lab(k, "reg_cor")) for k in kinds}
    outp = [compare(rc[ls], rc[k], f"label smoothing − {plots.label(MANIPULATIONS, k)} (reg ∩ correct)", ">")
            for k in kinds if k != ls and ls in rc]
    for c in outp:
        c.update(diff=c["diff"] / gap_pts, ci_low=c["ci_low"] / gap_pts, ci_high=c["ci_high"] / gap_pts)
    def against(c: Cmp) -> str:
        return c["label"].split(" − ")[1].split(" (")[0]

    won = [against(c) for c in outp if c["verdict"] == "A > B"]
    lost = [against(c) for c in outp if c["verdict"] == "A < B"]
    v1 = nm or ("holds" if outp and len(won) == len(outp) else
                f"does not hold (below {', '.join(lost)})" if lost else
                f"partly: above {', '.join(won)}; no clear difference from the rest" if won else
                "no clear difference")
    vb, who, cb = best_subset(df, means, "manipulation", ls, lambda x: lab(ls, x))
    v2 = nm or ("holds" if vb == "best" and who == "reg_cor" else f"tie ({who})" if vb == "tie" else
                f"does not hold (best: {who})" if vb == "best" else vb)
    approx = compare(rc.get(ls, {}), per_seed(df, "strong teacher only"), "label smoothing (reg ∩ correct) − strong teacher only",
                     "≈", gap_pts)
    v3 = nm or {"A ≈ B": "holds", "different": "does not hold", "undecided": "undecided"}.get(approx["verdict"], approx["verdict"])
    weak = per_seed(df, "weak teacher only")
    amps = []
    for k in [k for k in kinds if k != ls]:
        for x in [x for x in SUBSETS if lab(k, x)]:
            c = compare(per_seed(df, lab(k, x)), weak, f"{plots.label(MANIPULATIONS, k)} on {x} − weak teacher only", ">",
                        gap_pts)
            amps.append(c)
    gains = [c for c in amps if c["verdict"] == "A > B"]
    v4 = nm or ("holds: no amplification beats the weak teacher's student by an interval" if amps and not gains else
                f"does not hold: {len(gains)} of {len(amps)} amplification cells beat it"
                if gains else "not measured")
    fr = forest(name, outp + [approx] + amps, f"{name}: seed-paired differences in normalized accuracy",
                "normalized accuracy", effects.MARGIN_NORM)
    text = f"""### {name}

{scale_line(df)}. {teachers_line(df)}. {atext}.

Normalized accuracy of the final epochs (mean ± 95 % half-width over seeds):

{tab}

{fig}

1. *"label smoothing outperforms the other two simple manipulations"* (on reg ∩ correct, normalized units) — **{v1}**:

{cmp_table(outp, 'normalized')}

2. *"the label smoothing manipulation on the 'regularization&correct' subset achieves the best result"* —
   **{v2}**{f" (best − runner-up {cb.text()} points)" if cb else ""}.
3. *"approximating the strong teacher-based distillation"* (normalized ≈ 1: label smoothing on reg ∩ correct
   minus the strong teacher's student inside ±{effects.MARGIN_NORM:.2f}) — **{v3}**: {approx.text()} normalized.
4. *"teacher amplification and student amplification cannot enhance the knowledge or even lead to worse
   results"* (no amplification beats the weak teacher's student, on any subset) — **{v4}**:

{cmp_table(amps, 'normalized')}

{fr}
"""
    return text, [["Fig. 6", name, "label smoothing outperforms the amplifications", v1],
                  ["Fig. 6", name, "label smoothing best on reg ∩ correct", v2],
                  ["Fig. 6", name, "LS on reg ∩ correct ≈ strong teacher", v3],
                  ["Fig. 6", name, "amplifications do not help", v4.split(":")[0]]]


def section_fig7(name: str, study_dir: Path, fig: str) -> tuple[str, list[list[str]]]:
    d = plots._load_fgsm(study_dir)
    eps_all = sorted(d["eps"].unique())
    n_runs = int(d["run"].nunique())
    # sample counts: per run, how many samples of each subset were drawn, and how many existed
    cnt = (d.groupby(["run", "subset"]).agg(drawn=("sample", "nunique"),
                                             pool=("pool", "max") if "pool" in d else ("sample", "nunique"))
           .reset_index())
    seed_of = {}
    for f in (study_dir / "fgsm").glob("*/fgsm.json"):   # each probe's record names its run's seed
        try:
            seed_of[f.parent.name] = int(json.loads(f.read_text()).get("seed"))
        except (OSError, ValueError, TypeError):
            pass
    count_rows = []
    for run, g in cnt.groupby("run"):
        c = {r["subset"]: r for _, r in g.iterrows()}
        count_rows.append([seed_of.get(run, run)] + [f"{int(c[x]['drawn'])} of {int(c[x]['pool'])}" if x in c else "-"
                                                     for x in ("kept", "manipulated")])
    rows, cmps, verdicts = [], [], {}
    for e in eps_all:
        x = d[np.isclose(d["eps"], e)]
        per = x.groupby(["network", "run", "subset"])["drop"].mean().unstack("subset")
        per = (per["manipulated"] - per["kept"]).unstack("network")     # rows: run, cols: network
        g = {net: {str(r): float(v) for r, v in per[net].dropna().items()} for net in plots.NETWORK_ORDER if net in per}
        zero = {str(r): 0.0 for r in per.index}
        row = [f"{e:.4g}"]
        for net in plots.NETWORK_ORDER:
            if net not in g:
                row.append("")
                continue
            c = compare(g[net], zero, f"eps {e:.4g}: {plots.NETWORK_TITLE[net]} gap", ">")
            cmps.append(c)
            verdicts[(e, net)] = c
            row.append(f"{c.text(4)} **{c['verdict'].replace('A > B', '> 0').replace('A < B', '< 0')}**")
        for net in ("student", "undistilled"):
            if net in g and "teacher" in g:
                c = compare(g[net], g["teacher"], f"eps {e:.4g}: {plots.NETWORK_TITLE[net]} gap − teacher gap", ">")
                cmps.append(c)
                verdicts[(e, net, "vs")] = c
                row.append(f"{c.text(4)} **{c['verdict'].replace('A > B', '> 0').replace('A < B', '< 0')}**")
            else:
                row.append("")
        rows.append(row)
    # the paper: the teacher's gap is negative (manipulated samples lose less confidence) and the
    # student's and the undistilled network's gaps are larger in that direction, at every eps
    def count(pred) -> str:
        return f"{sum(1 for e in eps_all if pred(e))} of {len(eps_all)} eps"

    nm = f"not measurable here (n={n_runs} < {effects.MIN_SEEDS} seeds)" if n_runs < effects.MIN_SEEDS else None
    t_neg = count(lambda e: verdicts.get((e, "teacher"), {}).get("verdict") == "A < B")
    t_pos = count(lambda e: verdicts.get((e, "teacher"), {}).get("verdict") == "A > B")
    # claim 2 reads the teacher's gap as negative: it is tested only at the eps where it is
    def v_of(*key) -> str:
        return verdicts[key]["verdict"] if key in verdicts else ""

    t_ok = [e for e in eps_all if v_of(e, "teacher") == "A < B"]
    larger = {net: sum(1 for e in t_ok if v_of(e, net) == "A < B" and v_of(e, net, "vs") == "A < B")
              for net in ("student", "undistilled")}
    neg = {net: count(lambda e, n_=net: v_of(e, n_) == "A < B") for net in ("student", "undistilled")}
    all_eps = len(eps_all)
    v1 = nm or ("holds at every eps" if t_neg.startswith(f"{all_eps} of") else
                f"does not hold: the teacher's gap is positive (manipulated samples lose more) at {t_pos}"
                if not t_pos.startswith("0 of") else f"holds at {t_neg} (elsewhere no clear sign)")
    v2 = nm or (f"not testable here: the teacher's gap is negative at no eps (the student's gap is negative at "
                f"{neg['student']}, the undistilled network's at {neg['undistilled']})" if not t_ok else
                "; ".join(f"{plots.NETWORK_TITLE[net]}: larger at {larger[net]} of the {len(t_ok)} eps where the "
                          f"teacher's gap is negative" for net in ("student", "undistilled")))
    fr = forest(name, cmps, f"{name}: manipulated − kept confidence drop (and each gap − the teacher's)",
                "mean true-class confidence drop, manipulated − kept")
    text = f"""### {name}

Mean true-class confidence drop under FGSM (from the teacher), manipulated minus kept samples, per network,
with its 95 % interval over {n_runs} seed{'s' if n_runs != 1 else ''} (one distilled run per seed). Negative:
the manipulated samples lose *less* confidence (the paper's "less sensitive"). The last two columns: the
student's and the undistilled network's gap minus the teacher's (negative: larger in the paper's direction).

{md_table(["eps", "teacher", "distilled student", "undistilled network", "student − teacher", "undistilled − teacher"], rows)}

Samples probed per seed (drawn of those that existed in the subset):

{md_table(["seed", "kept", "manipulated"], count_rows)}

{fig}

1. *"confidence in manipulated samples is less sensitive to adversarial examples"* (the teacher's gap < 0) —
   **{v1}**.
2. *"the impact gap between the two sample subsets ... becomes larger"* on the student and an undistilled
   network (their gap < 0 and below the teacher's) — **{v2}**.

{fr}
"""
    return text, [["Fig. 7", name, "manipulated samples less sensitive (teacher)", v1],
                  ["Fig. 7", name, "gap larger on student / undistilled", v2]]


def section_fig8(name: str, df: pd.DataFrame, fig: str) -> tuple[str, list[list[str]]]:
    st = students(df).copy()
    st["train"] = [last_metric(r, "train_top1") for r in st["run_dir"]]
    st["val"] = [last_metric(r, "test_top1") for r in st["run_dir"]]
    st["gap"] = st["train"] - st["val"]
    keep, manip = "keep incorrect (reg_cor)", "manipulate incorrect (reg)"
    cm = [compare(per_seed(st, manip, k), per_seed(st, keep, k), f"{what}: CKM on all reg − on reg ∩ correct", ">")
          for k, what in (("gap", "train − validation gap"), ("train", "train top-1"), ("val", "validation top-1"))]
    v = {"A > B": "holds", "A < B": "does not hold (the gap shrinks)"}.get(cm[0]["verdict"], cm[0]["verdict"])
    fr = forest(name, cm, f"{name}: last epoch, seed-paired", "points")
    text = f"""### {name}

{scale_line(df)}. {teachers_line(df)}.

{fig}

*"{FIG8_QUOTE}"* (caption: higher training accuracy, lower testing accuracy) — **{v}**. At the last epoch,
seed-paired (points; train accuracy on the training batches as trained):

{cmp_table(cm, 'points')}

{fr}
"""
    return text, [["Fig. 8", name, "train − val gap grows when incorrect samples are manipulated", v],
                  ["Fig. 8", name, "caption: train higher, val lower",
                   f"train {cm[1]['verdict']}, val {cm[2]['verdict']}"]]


def section_table1(name: str, df: pd.DataFrame, study_dir: Path) -> tuple[str, list[list[str]]]:
    tables.table1(study_dir)
    st = students(df)
    texts, summary, allc = [], [], []
    t = df[(df["role"] == "teacher") & (df["state"] == "done")]
    for setting in dict.fromkeys(st["setting"]):
        w = {"setting": setting}
        g = st[st["setting"] == setting]
        rows = [[lab, fmt(*ci(g[g["label"] == lab][M])[:2]), fmt(*ci(g[g["label"] == lab]["last_top5"])[:2]),
                 fmt(*ci(g[g["label"] == lab]["best_top1"])[:2])]
                for lab in ["no distill", "KD", "RKD", "WSL", "EffDstl"] if (g["label"] == lab).any()]
        # the order the paper's numbers show in both pairs and both columns; its RKD row is below no
        # distillation in some of them, so no claim about RKD is tested
        chain = [("EffDstl", "WSL"), ("WSL", "KD"), ("KD", "no distill"), ("EffDstl", "KD")]
        cm = [compare(per_seed(df, a, **w), per_seed(df, b, **w), f"{a} − {b}", ">") for a, b in chain]
        nd = per_seed(df, "no distill", **w)
        weak = t[t["label"] == "teacher weak"][M]
        nm = (f"not measurable here: the stage-1 teacher ({float(weak.iloc[0]):.2f} %) does not beat the student "
              f"alone ({np.mean(list(nd.values())):.2f} %)" if len(weak) and nd and float(weak.iloc[0]) <= np.mean(list(nd.values()))
              else None)
        for c in cm:
            c["label"] = f"{setting or 'default'}: {c['label']}"
        allc += cm
        texts.append(f"""Setting `{setting or 'default'}` — final-epoch top-1 and top-5 (mean ± 95 % half-width over seeds):

{md_table(["method", "top-1 (%)", "top-5 (%)", f"best-epoch top-1 ({effects.TEST_CHOSEN})"], rows)}

The paper's Table 1 prints EffDstl > WSL > KD > no distillation in both pairs and both columns (top-1;
its RKD row is below no distillation in some, so RKD is not tested); each step, seed-paired (points):

{cmp_table(cm, 'points')}
{f"{chr(10)}{nm}.{chr(10)}" if nm else ""}""")
        failed = df[(df["state"] == "failed") & (df["role"] == "student") & (df["setting"] == setting)]
        for lab, fg in failed.groupby("label"):   # a run that failed is no result: say which and why
            texts.append(f"{lab}: {len(fg)} run(s) failed ({'; '.join(sorted(set(map(str, fg['fail_reason']))))}), "
                         f"so {lab} is compared over the seeds that finished.\n")
        for c, (a, b) in zip(cm, chain):
            summary.append(["Table 1", name, f"{setting + ': ' if setting else ''}{a} > {b}", nm.split(":")[0] if nm else
                            {"A > B": "holds", "A < B": "reversed"}.get(c["verdict"], c["verdict"])])
    fr = forest(name, allc, f"{name}: seed-paired differences, final epoch", "top-1 points")
    return (f"### {name}\n\n{scale_line(df)}. {teachers_line(df)}. {schedule_line(st)}\n\n" + "\n".join(texts)
            + f"\n{fr}\n", summary)


def schedule_line(st: pd.DataFrame) -> str:
    """The schedule each method of a Table 1 study trains with, read from its runs' configs."""
    by: dict[tuple, set] = {}
    for d, lab in zip(st["run_dir"], st["label"]):
        try:
            stages = RunDir(d).config.get("stages") or []
        except EffdstlError:
            continue
        by.setdefault(tuple((int(g["epochs"]), float(g["optim"]["lr"])) for g in stages), set()).add(lab)
    parts = []
    for sched, labs in by.items():
        steps = " then ".join(f"{e} epochs from lr {lr:g}" for e, lr in sched)
        parts.append(f"{', '.join(sorted(labs))}: {steps}")
    return ("Schedules, read from the runs (cosine per stage; a second stage switches to the stronger "
            f"teacher): {'; '.join(parts)}.")


def section_table4(name: str, df: pd.DataFrame, study_dir: Path) -> tuple[str, list[list[str]]]:
    out, paths = tables.table4(study_dir)
    md = paths[0].read_text().split("\n", 2)[2].replace("\n## ", "\n#### ")   # without its title, its parts nested
    cm, summary = [], []
    for _, r in out[out["versus"].astype(str) != ""].iterrows():
        if not r["run"] or r["part"] == "":
            continue
        a, b = per_seed(df, r["label"]), per_seed(df, r["versus"])
        if r["part"] == "d" and "0.8" in r["label"]:
            c = compare(a, b, f"{r['label']} − {r['versus']}", "≈", 1.0, effects.MARGIN_POINTS)
            paper = f"paper {r['paper_delta']:+.2f}: ≈ within ±{effects.MARGIN_POINTS}"
            ok = {"A ≈ B": "agrees", "different": "differs", "undecided": "undecided"}.get(c["verdict"], c["verdict"])
        else:
            c = compare(a, b, f"{r['label']} − {r['versus']}", ">")
            want = "A > B" if r["paper_delta"] > 0 else "A < B"
            paper = f"paper {r['paper_delta']:+.2f}: {want}"
            ok = ("agrees" if c["verdict"] == want else "opposite" if c["verdict"] in ("A > B", "A < B")
                  else c["verdict"])
        c["paper"], c["agrees"] = paper, ok
        cm.append(c)
        summary.append(["Table 4", name, f"{r['label']} vs {r['versus']} ({paper})", ok])
    rows = [[c["label"], c["paper"], c.text(), f"**{c['verdict']}**", c["agrees"]] for c in cm]
    fr = forest(name, cm, f"{name}: each row − the row the paper reads it against (final epoch)", "top-1 points")
    return f"""### {name}

{scale_line(df)}. {teachers_line(df)}.

{md}

Each row the paper reads against another, seed-paired (points), with the paper's difference and direction:

{md_table(["comparison", "paper", "ours", "verdict", "against the paper"], rows)}

{fr}
""", summary


# -- the report -----------------------------------------------------------------------------------

CLAIMS = {
    "figure5": ("Fig. 5 — replacing the weak teacher's targets with the strong one's", FIG5_QUOTE),
    "figure6": ("Fig. 6 — manipulating the weak teacher's targets alone", FIG6_QUOTE),
    "figure7": ("Fig. 7 — FGSM boundary probe", FIG7_QUOTE),
    "figure8": ("Fig. 8 — keeping incorrect samples", FIG8_QUOTE),
    "table1": ("Table 1 — EffDstl against no distillation, KD, RKD and WSL",
               None),
    "table4": ("Table 4 — ablations", None),
}
TABLE_NOTES = {
    "table1": ("The paper's Table 1 (ImageNet top-1 / top-5, as printed) is beside ours in each study's "
               "`tables/table1.md` (`effdstl table table1 STUDY`). Its WSL row is the WSL authors' released "
               "loss, and so is ours (`wsl_released`: CE + 2.5 × the soft loss, weights from cross entropies at "
               "T = 1); EffDstl's stage 1 is its own variant (`wsl`)."),
    "table4": ("The paper's Table 4 as printed (letters, rows and numbers) with our rows beside it. The paper's "
               "reading of it (Sec. 6.4, as the reference summarises it): a slightly worse stage-1 teacher "
               "(MobileNet V2) gives a much worse result; teachers of the same type in both stages may help; "
               "each other row is read against the row above it, as its numbers show."),
}


def build(results: Path) -> str:
    sections, summary = [], []
    FIGDIR.mkdir(parents=True, exist_ok=True)
    for old in FIGDIR.iterdir():   # what this report does not write again is not left behind
        if old.is_file():
            old.unlink()
    for kind in KINDS:
        title, claim = CLAIMS[kind]
        body = [f"## {title}", ""]
        body += [f"**The paper, in its words:**", "", quote(claim), ""] if claim else [TABLE_NOTES[kind], ""]
        for ds in DATASETS:
            study = f"{kind}-{ds}"
            sd = results / study
            try:
                df = collect(sd)
                if kind == "figure5":
                    text, v = section_fig5(study, df, copy_fig(plots.figure5(sd, FIGDIR / "_tmp"), study))
                elif kind == "figure6":
                    text, v = section_fig6(study, df, copy_fig(plots.figure6(sd, FIGDIR / "_tmp"), study))
                elif kind == "figure7":
                    text, v = section_fig7(study, sd, copy_fig(plots.figure7(sd, FIGDIR / "_tmp"), study))
                elif kind == "figure8":
                    text, v = section_fig8(study, df, copy_fig(plots.figure8(sd, FIGDIR / "_tmp"), study))
                elif kind == "table1":
                    text, v = section_table1(study, df, sd)
                else:
                    text, v = section_table4(study, df, sd)
            except (EffdstlError, KeyError, IndexError, ValueError) as exc:
                why = str(exc).replace(f"{results.resolve()}/", "").replace(f"{results}/", "")   # no local paths
                text, v = f"### {study}\n\nnot measured: {why}\n", [[title.split(" — ")[0], study, "—", "not measured"]]
            body.append(text)
            summary += [r + [minutes(sd)] for r in v]
        sections.append("\n".join(body))
    shutil.rmtree(FIGDIR / "_tmp", ignore_errors=True)
    eff = []
    for kind in KINDS:
        for ds in DATASETS:
            sd = results / f"{kind}-{ds}"
            if (sd / "runs").is_dir():
                try:
                    paired_effects(collect(sd), metric=M).to_csv(FIGDIR / f"effects-{kind}-{ds}.csv", index=False)
                    eff.append(f"`findings/effects-{kind}-{ds}.csv`")
                except EffdstlError:
                    pass
    return "\n".join([header(results), md_table(["figure / table", "study", "claim", "verdict", "training (min)"],
                                                summary), "", TIME_NOTE, "", *sections, FOOTER,
                      "Every configuration's seed-paired difference to its study's anchor (final epoch, "
                      f"`{M}`): " + ", ".join(eff) + "."])


def minutes(study_dir: Path) -> str:
    """The study's elapsed time: its first job's submission (job.json) to its last run's end
    (final.json's ``finished_at``; its file time for runs written before that key), as it ran on
    the machine that trained it (jobs in parallel where the launcher ran them so)."""
    import json

    runs = sorted((study_dir / "runs").glob("*/final.json"))
    starts = [json.loads(p.with_name("job.json").read_text()).get("submitted_at") for p in runs
              if p.with_name("job.json").exists()]
    starts = [float(t) for t in starts if t]
    if not runs or not starts:
        return "—"
    ends = [json.loads(p.read_text()).get("finished_at") or p.stat().st_mtime for p in runs]
    m = (max(ends) - min(starts)) / 60
    return f"{m:.1f}" if m >= 0.1 else "< 0.1"


def header(results: Path) -> str:
    """HEADER, with the data the CIFAR-10 studies ran on, as their runs record it."""
    specs = set()
    for kind in KINDS:
        try:
            specs |= set(collect(results / f"{kind}-cifar10-1k")["dataset"])
        except EffdstlError:
            pass
    names = sorted({x.split(":")[0] + ":" + Path(x.split(":", 1)[1]).name if ":" in x else x for x in map(str, specs)})
    where = (f"The CIFAR-10 studies here ran on `{', '.join(names)}` (their runs' dataset; a file by its name)."
             if specs else "No CIFAR-10 study has run yet.")
    return HEADER.replace("{where}", where).replace("{rules}", effects.RULES)


TIME_NOTE = ("*Training (min)*: from the study's first job to its last finished run, teachers and "
             "students, as the runs' own records give it (on whatever machine trained them, sharing it "
             "with whatever else ran; Fig. 7's probes not included). It is the one column a rerun does not "
             "reproduce exactly.")


HEADER = """# What the studies show (small data)

Generated by `make findings` (`scripts/findings.py`, `--results` names the runs' folder); every
number below is computed from the run directories. {where}

**The number.** Every figure, table, comparison and verdict uses the accuracy at the *final epoch*
(`last_top1`, `last_top5`). The best epoch's accuracy (`best_top1`) picks its epoch on the test set
— optimistic, and in the two-stage recipe it can be a stage-1 epoch — so it is only shown beside,
labelled "chosen on the test set".

**The rules** (`effdstl_cli/effects.py`, `RULES`), the only way a verdict below is reached: {rules}

**Scale.** The paper's experiments are ImageNet (Tables 1-4) and, for Fig. 5, CIFAR-10 and ImageNet.
These studies train small networks on small data; each section says which students, how many
epochs and seeds, read from its runs. A verdict says whether the claim holds *at this scale*; one
that does not hold here does not refute the paper at its scale.

How the CIFAR-10 triplets were chosen is in [docs/METHOD.md](METHOD.md), "Small data: choosing
triplets". The datasets: """ + "; ".join(f"`{k}` = {v}" for k, v in DATASETS.items()) + """.

## Verdicts

"""

FOOTER = """
## Not measured here

- **Table 3 (GPU-hours).** The paper's cost is ImageNet training on RTX 3090 GPUs; these small
  studies have only their own wall-clock (`effdstl table table3 STUDY` prints it per method, beside
  the paper's Table 3 as printed), which says nothing about the paper's numbers.
- **Table 4 (b)**, continuing with MEAL V2: not run (MEAL V2's training is not part of effdstl); the
  paper's numbers are printed in each `tables/table4.md`.
- **ImageNet numbers.** `studies/*-imagenet.yaml` hold the paper's settings for a GPU cluster.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--dataset", default=None, help="--set dataset=... for the CIFAR-10 studies (e.g. npz:data/cifar10.npz)")
    ap.add_argument("--no-run", action="store_true", help="write the report from the runs already there")
    ap.add_argument("--only", default="", help="comma-separated studies to run (default: every study); "
                    "the report still covers every study")
    a = ap.parse_args()
    results = Path(a.results)
    studies = [f"{kind}-{ds}" for kind in KINDS for ds in DATASETS]
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown_ = sorted(set(only) - set(studies))
    if unknown_:
        raise SystemExit(f"findings: --only names no study of the report: {', '.join(unknown_)} "
                         f"(studies: {', '.join(studies)})")
    if not a.no_run:
        for study in sorted(studies, key=lambda x: only.index(x) if x in only else len(only)):
            if not only or study in only:
                run_study(study, results, a.dataset)
    FIGDIR.mkdir(parents=True, exist_ok=True)
    text = build(results)
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(DOC)
    print(f"findings: wrote {DOC.relative_to(ROOT)} and {FIGDIR.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
