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
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effdstl_cli import plots, tables  # noqa: E402
from effdstl_cli.effects import effect_text, paired_difference, paired_effects  # noqa: E402
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

def ci(values) -> tuple[float, float, int]:
    mean, _, n, half = interval95(values)
    return mean, half, n


def fmt(mean: float, half: float, n: int | None = None, nd: int = 2, sign: bool = False) -> str:
    s = f"{mean:+.{nd}f}" if sign else f"{mean:.{nd}f}"
    if half == half:
        s += f" ± {half:.{nd}f}"
    return s + (f" (n={n})" if n is not None else "")


def paired(df: pd.DataFrame, a: str, b: str, metric: str = "best_top1", **where) -> dict:
    """Seed-paired ``metric(a) - metric(b)`` within the rows matching ``where`` (effects.paired_difference)."""
    st = df[(df["state"] == "done") & (df["role"] == "student")]
    for k, v in where.items():
        st = st[st[k] == v]
    runs = {lab: {int(s): float(x) for s, x in zip(g["seed"], g[metric])} for lab, g in st.groupby("label")}
    d = paired_difference(runs.get(a, {}), runs.get(b, {}))
    sig = d["n"] > 1 and d["verdict"] != "no clear difference"
    return {"mean": d["diff"], "half": d["ci95"], "n": d["n"], "lo": d["ci_low"], "hi": d["ci_high"],
            "sig": sig, "pos": sig and d["verdict"] == "higher", "neg": sig and d["verdict"] == "lower",
            "text": effect_text(d)}


def teachers_line(df: pd.DataFrame) -> str:
    t = df[(df["role"] == "teacher") & (df["state"] == "done")].sort_values("best_top1")
    parts = [f"{r['label'].removeprefix('teacher ')} {r['student']} {r['best_top1']:.2f} %" for _, r in t.iterrows()]
    return "teachers (test top-1): " + ", ".join(parts)


def copy_fig(res, name: str) -> str:
    FIGDIR.mkdir(parents=True, exist_ok=True)
    png = Path(res[0])
    dst = FIGDIR / f"{name}.png"
    shutil.copyfile(png, dst)
    return f"![{name}](findings/{dst.name})"


def last_metric(run_dir: str, key: str) -> float:
    rows = RunDir(run_dir).metrics
    return float(rows[-1][key]) if rows and key in rows[-1] else float("nan")


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# -- the sections --------------------------------------------------------------------------------

def anchors_text(df: pd.DataFrame) -> tuple[str, float]:
    st = df[(df["role"] == "student") & (df["state"] == "done")]
    lo = st[st["label"] == "weak teacher only"]["best_top1"]
    hi = st[st["label"] == "strong teacher only"]["best_top1"]
    m_lo, h_lo, n = ci(lo)
    m_hi, h_hi, _ = ci(hi)
    sd = max(float(lo.std(ddof=1)), float(hi.std(ddof=1)))
    ratio = (m_hi - m_lo) / sd if sd > 0 else float("inf")
    return (f"acc- (student from the weak teacher) {fmt(m_lo, h_lo)}, acc+ (from the strong one) "
            f"{fmt(m_hi, h_hi)} (n={n}); the gap acc+ − acc- is {m_hi - m_lo:.2f} points, "
            f"{ratio:.0f}× the larger seed standard deviation ({sd:.2f})"), ratio


def norm_table(df: pd.DataFrame, col: str, order: tuple, sub_order=None) -> tuple[str, pd.DataFrame]:
    sub_order = sub_order or tuple(SUBSETS)
    norm = normalized(df)
    g = norm.groupby([col, "subset"])["norm"]
    cells = {k: ci(v) for k, v in g}
    cols = [c for c in order if any(k[0] == c for k in cells)]
    subs = [s for s in sub_order if any(k[1] == s for k in cells)]
    rows = [[s] + [fmt(*cells[(c, s)][:2]) if (c, s) in cells else "" for c in cols] for s in subs]
    means = pd.DataFrame([{col: c, "subset": s, "mean": cells[(c, s)][0]} for c, s in cells])
    return md_table(["subset", *cols], rows), means


def section_fig5(name: str, df: pd.DataFrame, fig: str) -> tuple[str, str]:
    anchors, ratio = anchors_text(df)
    tab, means = norm_table(df, "scheme", tuple(SCHEMES))
    conf_part = paired(df, "confidence / all", "partial / all")
    full_conf = paired(df, "full / all", "confidence / all")
    full_part = paired(df, "full / all", "partial / all")
    p1 = conf_part["pos"] and full_part["pos"] and abs(full_conf["mean"]) < 0.5 * abs(full_part["mean"])
    full = means[(means["scheme"] == "full") & (means["subset"] != "all")].sort_values("mean", ascending=False)
    best, second = full["subset"].iloc[0], full["subset"].iloc[1]
    b2 = paired(df, f"full / {best}", f"full / {second}")
    v1 = "**reproduced**" if p1 else "**not reproduced**"
    if best == "reg_cor":
        v2 = "**reproduced**" + ("" if b2["pos"] else f" (but not clearly: reg_cor − {second} {b2['text']})")
    else:
        rc = paired(df, f"full / {best}", "full / reg_cor")
        v2 = (f"**not reproduced**: the best subset is `{best}` (full replacement, normalized "
              f"{full['mean'].iloc[0]:.2f}); {best} − reg_cor in accuracy: {rc['text']}")
    text = f"""### {name}

{teachers_line(df)}; {anchors}.

Normalized accuracy (mean ± 95 % half-width over seeds; 0 = acc-, 1 = acc+):

{tab}

{fig}

- *full ≈ confidence ≫ partial* — {v1}. On all samples, seed-paired accuracy differences (points):
  confidence − partial {conf_part['text']}, full − partial {full_part['text']}, full − confidence
  {full_conf['text']}.
- *reg ∩ correct is the subset that matters* — {v2}.
"""
    verdict = (f"full ≈ confidence ≫ partial: {'reproduced' if p1 else 'not reproduced'}; reg ∩ correct the best "
               f"subset: {'reproduced' if best == 'reg_cor' else f'not reproduced (best: {best})'}")
    return text, verdict


def section_fig6(name: str, df: pd.DataFrame, fig: str) -> tuple[str, str]:
    anchors, _ = anchors_text(df)
    tab, means = norm_table(df, "manipulation", tuple(MANIPULATIONS))
    lines, ok, bests = [], [], []
    for kind in [k for k in tuple(MANIPULATIONS) if (means["manipulation"] == k).any()]:
        labels = sorted(set(df[(df["manipulation"] == kind) & (df["subset"] == "reg_cor")]["label"]))
        if not labels:
            continue
        e = paired(df, labels[0], "weak teacher only")
        m = means[(means["manipulation"] == kind) & (means["subset"] != "all")].sort_values("mean", ascending=False)
        best = m["subset"].iloc[0]
        ok.append(e["pos"])
        bests.append(best)
        lines.append(f"  - {plots.label(MANIPULATIONS, kind)} on reg ∩ correct − weak teacher only: {e['text']} "
                     f"({'higher' if e['pos'] else 'lower' if e['neg'] else 'no clear difference'}); best subset: "
                     f"`{best}` (normalized {m['mean'].iloc[0]:.2f})")
    v = "reproduced" if all(ok) else "partly reproduced" if any(ok) else "not reproduced"
    n_rc = sum(b == "reg_cor" for b in bests)
    v2 = (f"reproduced for {n_rc} of {len(bests)} manipulations" if n_rc else
          f"not reproduced (best: {', '.join(sorted(set(bests)))})")
    text = f"""### {name}

{teachers_line(df)}; {anchors}.

Normalized accuracy (mean ± 95 % half-width over seeds):

{tab}

{fig}

- *Raising the weak teacher's confidence on reg ∩ correct samples alone helps* — **{v}**. Seed-paired
  accuracy differences (points):
{chr(10).join(lines)}
- *reg ∩ correct is the subset where it helps most* — **{v2}**.
"""
    return text, f"helps on reg ∩ correct: {v}; reg ∩ correct the best subset: {v2}"


def section_fig7(name: str, study_dir: Path, fig: str) -> tuple[str, str]:
    d = plots._load_fgsm(study_dir)
    eps_all = sorted(d["eps"].unique())
    rows, gaps = [], {}
    for e in eps_all:
        x = d[np.isclose(d["eps"], e)]
        per = (x.groupby(["network", "run", "subset"])["drop"].mean().unstack("subset"))
        per = (per["manipulated"] - per["kept"]).unstack("network")   # rows: run (seed), cols: network
        cells = {}
        for net in [n for n in plots.NETWORK_ORDER if n in per]:
            cells[net] = ci(per[net].dropna())
        dd = per["student"] - per["undistilled"] if {"student", "undistilled"} <= set(per) else pd.Series(dtype=float)
        # in the teacher's direction: how much more of the teacher's gap the student shows than the undistilled net
        toward = float(np.sign(cells["teacher"][0])) if "teacher" in cells else 1.0
        gaps[e] = (cells, ci((toward * dd).dropna()) if len(dd) else (float("nan"),) * 3,
                   ci((per["student"].abs() - per["undistilled"].abs()).dropna()) if len(dd) else (float("nan"),) * 3)
        rows.append([f"{e:.4g}"] + [fmt(*cells[n][:2], nd=4, sign=True) if n in cells else "" for n in plots.NETWORK_ORDER]
                    + [fmt(*gaps[e][2][:2], nd=4, sign=True), fmt(*gaps[e][1][:2], nd=4, sign=True)])
    n = int(d["run"].nunique())
    e_mid = eps_all[len(eps_all) // 2]
    cells, toward, diff = gaps[e_mid]
    same_sign = ("teacher" in cells and "student" in cells and np.sign(cells["teacher"][0]) == np.sign(cells["student"][0])
                 and abs(cells["student"][0]) > cells["student"][1])
    larger = diff[0] - diff[1] > 0
    v = "reproduced" if same_sign and larger else "partly reproduced" if same_sign or larger else "not reproduced"
    und = cells.get("undistilled", (float("nan"), float("nan"), 0))
    und_text = ("not clearly different from zero" if abs(und[0]) <= und[1] else
                "the teacher's sign" if np.sign(und[0]) == np.sign(cells.get("teacher", (1,))[0]) else
                "the opposite sign")
    text = f"""### {name}

Mean true-class confidence drop under FGSM (from the teacher), manipulated minus kept samples,
per network (mean ± 95 % half-width over {n} seed{'s' if n != 1 else ''}, one distilled run per seed). Paired by seed, the
last two columns compare the distilled student's gap with the undistilled network's: by size
(|student| − |undistilled|) and in the direction of the teacher's gap (student − undistilled, signed
so that positive means closer to the teacher):

{md_table(["eps", "teacher", "distilled student", "undistilled network", "|student| − |undistilled|",
           "student − undistilled (teacher's direction)"], rows)}

{fig}

- *Distillation transfers the teacher's boundary on the manipulated samples* — **{v}** at eps
  {e_mid:.4g}: the distilled student's gap has {'the teacher' + chr(39) + 's sign' if same_sign else 'not clearly the teacher' + chr(39) + 's sign'},
  and it is {'larger' if larger else 'not clearly larger'} than the undistilled network's ({fmt(*diff[:2], nd=4, sign=True)}).
  The undistilled network's own gap ({fmt(*und[:2], nd=4, sign=True)}) has {und_text}; in the teacher's
  direction the student is {fmt(*toward[:2], nd=4, sign=True)} from the undistilled network.
"""
    return text, v


def section_fig8(name: str, df: pd.DataFrame, fig: str) -> tuple[str, str]:
    st = df[(df["role"] == "student") & (df["state"] == "done")].copy()
    st["final_train_top1"] = [last_metric(r, "train_top1") for r in st["run_dir"]]
    st["final_test_top1"] = [last_metric(r, "test_top1") for r in st["run_dir"]]
    keep, manip = "keep incorrect (reg_cor)", "manipulate incorrect (reg)"
    tr = paired(st.assign(state="done"), manip, keep, "final_train_top1")
    va = paired(st.assign(state="done"), manip, keep, "final_test_top1")
    v = ("reproduced" if tr["pos"] and va["neg"] else "partly reproduced" if tr["pos"] or va["neg"]
         else "not reproduced")
    text = f"""### {name}

{teachers_line(df)}.

{fig}

- *Manipulating incorrect samples raises train accuracy and lowers validation accuracy* — **{v}**.
  Seed-paired differences at the last epoch, CKM on all reg minus CKM on reg ∩ correct (points):
  train top-1 {tr['text']}, validation top-1 {va['text']}.
"""
    return text, v


def section_table1(name: str, df: pd.DataFrame, study_dir: Path) -> tuple[str, str]:
    out, _ = tables.table1(study_dir)
    st = df[(df["role"] == "student") & (df["state"] == "done")]
    texts, verdicts = [], []
    for setting in dict.fromkeys(st["setting"]):
        w = {"setting": setting}
        g = st[st["setting"] == setting]
        rows = []
        for lab in ["no distill", "KD", "RKD", "WSL", "EffDstl"]:
            v = g[g["label"] == lab]["best_top1"]
            if len(v):
                e = paired(df, lab, "no distill", **w) if lab != "no distill" else None
                rows.append([lab, fmt(*ci(v)[:2]), e["text"] if e else "—"])
        nd = g[g["label"] == "no distill"]
        fit = (f"no distillation ends at train top-1 {np.mean([last_metric(r, 'train_top1') for r in nd['run_dir']]):.2f} "
               f"(on its training batches{'' if RunDir(Path(nd['run_dir'].iloc[0])).config.get('augment', True) else ', without augmentation'}) "
               f"and test top-1 {np.mean([last_metric(r, 'test_top1') for r in nd['run_dir']]):.2f}"
               if len(nd) else "")
        kd = paired(df, "KD", "no distill", **w)
        ew = paired(df, "EffDstl", "WSL", **w)
        ek = paired(df, "EffDstl", "KD", **w)
        v_kd = "reproduced" if kd["pos"] else "not reproduced"
        v_ew = "reproduced" if ew["pos"] else ("not reproduced (WSL is higher)" if ew["neg"] else
                                               "not reproduced (no clear difference)")
        verdicts.append(f"{f'{setting}: ' if setting else ''}KD > no distill: {v_kd}; EffDstl > WSL: {v_ew}")
        texts.append(f"""Setting `{setting or 'default'}` — best top-1 (mean ± 95 % half-width over seeds) and the seed-paired
difference to no distillation (points):

{md_table(["method", "best top-1 (%)", "− no distill"], rows)}

- *KD beats no distillation* — **{v_kd}**: {kd['text']}. For scale: {fit}.
- *EffDstl beats WSL (and KD)* — **{v_ew}**: EffDstl − WSL {ew['text']}; EffDstl − KD {ek['text']}.
""")
    del out
    return f"### {name}\n\n{teachers_line(df)}.\n\n" + "\n".join(texts), "; ".join(verdicts)


def section_table4(name: str, df: pd.DataFrame, study_dir: Path) -> tuple[str, str]:
    tables.table4(study_dir)
    ref = "EffDstl (switch, tau 0.7, CKM)"
    st = df[(df["role"] == "student") & (df["state"] == "done")]
    claims = [("(c) τ_t 0.7 beats 0.8", ref, "tau 0.8"), ("(c) τ_t 0.7 beats 1.0", ref, "tau 1.0"),
              ("(d) CKM on beats CKM off", ref, "CKM off"), ("(e) switching to the stronger teacher beats not", ref,
                                                             "no teacher switch"),
              ("(a) a stronger stage-2 teacher helps", "pair weak -> strong", "pair weak -> weak")]
    rows, ok = [], []
    for claim, a, b in claims:
        if not ((st["label"] == a).any() and (st["label"] == b).any()):
            continue
        e = paired(df, a, b)
        ok.append(e["pos"])
        rows.append([claim, f"{a} − {b}", e["text"], "reproduced" if e["pos"] else
                     "opposite" if e["neg"] else "no clear difference"])
    accs = [[lab, fmt(*ci(st[st["label"] == lab]["best_top1"])[:2])] for lab in dict.fromkeys(st["label"])]
    v = f"{sum(ok)} of {len(ok)} ablation claims reproduced"
    return f"""### {name}

{teachers_line(df)}.

{md_table(["variant", "best top-1 (%)"], accs)}

Seed-paired differences (points):

{md_table(["claim", "difference", "points", "verdict"], rows)}
""", v


# -- the report -----------------------------------------------------------------------------------

CLAIMS = {
    "figure5": ("Fig. 5 — replacing the weak teacher's targets with the strong one's",
                "What the strong teacher adds is its confidence on the true class (replacing the full target "
                "or only the confidence recovers it, replacing only the non-true-class distribution much "
                "less), and it matters most on the regularization samples the weak teacher predicts "
                "correctly (reg ∩ correct)."),
    "figure6": ("Fig. 6 — manipulating the weak teacher's targets alone",
                "Without a second teacher, raising the weak teacher's true-class confidence (label smoothing "
                "towards the label, teacher or student amplification) on reg ∩ correct samples improves the "
                "student."),
    "figure7": ("Fig. 7 — FGSM boundary probe",
                "The manipulated (reg ∩ correct) samples sit differently with respect to the decision boundary "
                "than the kept ones, and the distilled student inherits the teacher's difference while an "
                "undistilled network does not."),
    "figure8": ("Fig. 8 — keeping incorrect samples",
                "Mining incorrectly predicted samples too (CKM on all reg samples) raises train accuracy and "
                "lowers validation accuracy: keep them out."),
    "table1": ("Table 1 — EffDstl against no distillation, KD, RKD and WSL",
               "EffDstl (WSL, then CKM with a stronger teacher) beats WSL, which beats KD, RKD and no distillation."),
    "table4": ("Table 4 — ablations",
               "Each part of the recipe helps: τ_t = 0.7, CKM, switching to a stronger teacher in stage 2, "
               "and a stronger stage-2 teacher."),
}


def build(results: Path) -> str:
    sections, summary = [], []
    for kind in KINDS:
        title, claim = CLAIMS[kind]
        body = [f"## {title}", "", f"**The paper's claim.** {claim}", ""]
        for ds in DATASETS:
            study = f"{kind}-{ds}"
            sd = results / study
            try:
                df = collect(sd)
                if kind == "figure5":
                    text, v = section_fig5(study, df, copy_fig(plots.figure5(sd), study))
                elif kind == "figure6":
                    text, v = section_fig6(study, df, copy_fig(plots.figure6(sd), study))
                elif kind == "figure7":
                    text, v = section_fig7(study, sd, copy_fig(plots.figure7(sd), study))
                elif kind == "figure8":
                    text, v = section_fig8(study, df, copy_fig(plots.figure8(sd), study))
                elif kind == "table1":
                    text, v = section_table1(study, df, sd)
                else:
                    text, v = section_table4(study, df, sd)
            except (EffdstlError, KeyError, IndexError) as exc:
                text, v = f"### {study}\n\nnot measured: {exc}\n", "not measured"
            body.append(text)
            summary.append([title.split(" — ")[0], study, v, minutes(sd)])
        sections.append("\n".join(body))
    eff = []
    for kind in KINDS:
        for ds in DATASETS:
            sd = results / f"{kind}-{ds}"
            if (sd / "runs").is_dir():
                try:
                    paired_effects(collect(sd)).to_csv(FIGDIR / f"effects-{kind}-{ds}.csv", index=False)
                    eff.append(f"`findings/effects-{kind}-{ds}.csv`")
                except EffdstlError:
                    pass
    return "\n".join([header(results), md_table(["figure / table", "study", "verdict", "training (min)"], summary), "",
                      TIME_NOTE, "", *sections, FOOTER,
                      "Every configuration's seed-paired difference to its study's anchor: " + ", ".join(eff) + "."])


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
    """HEADER, with the data the CIFAR-10 studies actually ran on (read from their runs)."""
    specs = set()
    for kind in KINDS:
        try:
            specs |= set(collect(results / f"{kind}-cifar10-1k")["dataset"])
        except EffdstlError:
            pass
    if any(str(x).startswith("npz:") for x in specs):
        where = (f"The CIFAR-10 studies here ran on a JPEG re-encoded copy of CIFAR-10 "
                 f"(`--set dataset={sorted(specs)[0]}`), so their accuracies sit a little under torchvision's CIFAR-10.")
    elif specs:
        where = "The CIFAR-10 studies here ran on torchvision's CIFAR-10."
    else:
        where = "No CIFAR-10 study has run yet."
    return HEADER.replace("{where}", where)


TIME_NOTE = ("*Training (min)*: from the study's first job to its last finished run, teachers and "
             "students, on the machine that trained them (2 CPU cores here; Fig. 7's probes not "
             "included). It is the one column a rerun does not reproduce exactly.")


HEADER = """# What the studies show (small data)

Generated by `make findings` (`scripts/findings.py`) from the runs under `results/`; every number
below is computed from the run directories, with seed-paired differences and 95 % t-intervals
over seeds (`effdstl results STUDY` prints the same intervals). {where}

Scale matters: the paper trains ResNets on CIFAR-100 and ImageNet for hundreds of epochs; these
studies train MLP students on 10 000 CIFAR-10 images (or 1078 digits) for 20 to 40 epochs on two
CPU cores. A verdict says whether the claim holds *at this scale*, by the interval; "not
reproduced" here does not refute the paper at its scale.

How the CIFAR-10 triplets were chosen is in [docs/METHOD.md](METHOD.md), "Small data: choosing
triplets". The datasets: """ + "; ".join(f"`{k}` = {v}" for k, v in DATASETS.items()) + """.

## Verdicts

"""

FOOTER = """
## Not measurable here

- **Table 3 (GPU-hours).** The paper's cost is ImageNet training on GPUs; on two CPU cores only the
  wall-clock of these small studies exists (`effdstl table table3 STUDY` prints it per method), which
  says nothing about the paper's numbers.
- **ImageNet and CIFAR-100 numbers.** Not at this scale; `studies/*-imagenet.yaml` and
  `studies/*-cifar10.yaml` hold the paper's settings for a GPU cluster.
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
