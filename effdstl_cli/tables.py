"""The paper's tables (Table 1, 3, 4) from a study directory: Markdown, CSV and LaTeX.

Each ``tableN(study_dir, out_dir=None)`` returns ``(DataFrame, [md, csv, tex])``; files go to
``study_dir/tables/tableN.{md,csv,tex}`` by default, written atomically. The Markdown is padded
so it reads in a terminal as it is. The paper's numbers (docs/METHOD.md) are printed beside ours.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml

from .errors import EffdstlError
from .io import atomic_write, atomic_write_text
from .results import collect

METHODS = ("none", "kd", "rkd", "wsl", "effdstl")
METHOD_NAME = {"none": "no distill", "kd": "KD", "rkd": "RKD", "wsl": "WSL", "effdstl": "EffDstl",
               "ckm": "CKM", "replace": "replacement", "manipulate": "manipulation"}

# Table 1 of the paper (ImageNet top-1 %, "advanced" schedule / 100 epochs), docs/METHOD.md.
PAPER_TABLE1: dict[str, dict[str, Any]] = {
    "ResNet34->ResNet18": {
        "teacher": "ResNet34", "student": "ResNet18", "dataset": "ImageNet",
        "rows": {"none": (72.30, 69.75), "kd": (72.90, 70.67), "rkd": (72.19, 70.40),
                 "wsl": (73.44, 72.04), "effdstl": (74.07, 72.17)}},
    "ResNet50->MobileNetV1": {
        "teacher": "ResNet50", "student": "MobileNetV1", "dataset": "ImageNet",
        "rows": {"none": (73.29, 68.87), "kd": (74.50, 70.49), "rkd": (74.08, 68.50),
                 "wsl": (74.78, 71.52), "effdstl": (75.49, 71.91)}},
}
REFERENCE_PAIR = "ResNet34->ResNet18"
# Table 3: EffDstl ResNet34 -> ResNet18 training cost in the paper.
PAPER_TABLE3 = {"method": "effdstl", "pair": REFERENCE_PAIR, "gpu_hours": 97.7, "device": "RTX 3090"}
ABLATION_ORDER = ("EffDstl (switch, tau 0.7, CKM)", "teacher switch", "no teacher switch", "tau 0.7",
                  "tau 0.8", "tau 1.0", "CKM on", "CKM off")


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def paper_pair(student: str, teacher: str) -> str | None:
    """The paper's Table 1 pair matching (loosely) these model specs, else None.

    'tv:resnet18' from 'timm:resnet34d' -> ResNet34->ResNet18; any MobileNet (v1) from a
    ResNet50 -> ResNet50->MobileNetV1.
    """
    s, t = _squash(student), _squash(teacher)
    if "resnet18" in s and "resnet34" in t:
        return "ResNet34->ResNet18"
    if "mobilenet" in s and not re.search(r"mobilenetv[234]", s) and "resnet50" in t:
        return "ResNet50->MobileNetV1"
    return None


# -- formatting ----------------------------------------------------------------------------

def _num(v: Any, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{float(v):.{nd}f}"


def _pm(mean: Any, std: Any, nd: int = 2) -> str:
    if mean is None or not math.isfinite(float(mean)):
        return "-"
    if std is None or not math.isfinite(float(std)):
        return _num(mean, nd)
    return f"{float(mean):.{nd}f} ± {float(std):.{nd}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A pipe table padded to column width (readable raw in a terminal); align 'l' or 'r'."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    align = list(align or ["l"] + ["r"] * (len(header) - 1))

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)) + " |"

    rule = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":")
                          for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule, *[line(r) for r in cells[1:]]])


_TEX_ESC = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: Any) -> str:
    out = "".join(_TEX_ESC.get(ch, ch) for ch in str(s))
    return (out.replace("±", r"$\pm$").replace("→", r"$\rightarrow$").replace("∩", r"$\cap$")
            .replace("Δ", r"$\Delta$").replace("τ", r"$\tau$"))


def latex_table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str, label: str,
                align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    body = [r"\begin{table}[t]", r"\centering", rf"\caption{{{tex_escape(caption)}}}", rf"\label{{{label}}}",
            rf"\begin{{tabular}}{{{align}}}", r"\toprule",
            " & ".join(tex_escape(h) for h in header) + r" \\", r"\midrule"]
    body += [" & ".join(tex_escape(c) for c in r) + r" \\" for r in rows]
    body += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(body)


def _write(out_dir: Path, stem: str, df: pd.DataFrame, md: str, tex: str) -> list[Path]:
    md_p = atomic_write_text(out_dir / f"{stem}.md", md.rstrip() + "\n")
    csv_p = atomic_write(out_dir / f"{stem}.csv", lambda p: df.to_csv(p, index=False))
    tex_p = atomic_write_text(out_dir / f"{stem}.tex", tex)
    return [md_p, csv_p, tex_p]


def _out(study_dir: Path, out_dir: str | Path | None) -> Path:
    return Path(out_dir) if out_dir is not None else study_dir / "tables"


def _done_students(study_dir: Path, what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    df = collect(study_dir)
    st = df[(df["role"] == "student") & (df["state"] == "done")]
    if st.empty:
        n = int((df["role"] == "student").sum())
        raise EffdstlError(f"no finished student runs in {study_dir} ({n} planned or unfinished): "
                           f"run the study before building {what}")
    return df, st


def _stats(v: pd.Series) -> tuple[float, float]:
    v = v.dropna().astype(float)
    if v.empty:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def _method_order(methods: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(methods))
    return [m for m in METHODS if m in present] + sorted(m for m in present if m not in METHODS)


def _joined(values: Sequence[str]) -> str:
    return ", ".join(v for v in dict.fromkeys(values) if v) or "-"


# -- Table 1 -------------------------------------------------------------------------------

def table1(study_dir: str | Path, out_dir: str | Path | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """Table 1: top-1 of no distill / KD / RKD / WSL / EffDstl, ours (mean ± std over seeds of
    best and last top-1) beside the paper's (advanced schedule / 100 epochs).

    One block per (dataset, student); the teacher is the one distilled from first (meta.weak;
    EffDstl's stage-2 teacher is meta.strong). Pairs that are not the paper's get the paper's
    ResNet34->ResNet18 column as a reference, with a note that the setting differs.
    """
    study_dir = Path(study_dir)
    df, st = _done_students(study_dir, "Table 1")
    st = st[st["distiller"].isin(METHODS) | (st["study_kind"] == "recipe")]
    if st.empty:
        raise EffdstlError(f"no finished Table 1 runs (distiller none/kd/rkd/wsl/effdstl) in {study_dir}: "
                           f"run a recipe study")
    rows: list[dict[str, Any]] = []
    for (dataset, student), g in st.groupby(["dataset", "student"], sort=False):
        teacher = _joined(g["weak"].tolist())
        stage2 = _joined(g[g["distiller"] == "effdstl"]["strong"].tolist())
        key = paper_pair(student, teacher)
        ref = key or REFERENCE_PAIR
        if not key:
            note = (f"setting differs ({dataset}, {teacher} → {student}): the paper's "
                    f"{ref.replace('->', ' → ')} numbers are a reference only")
        elif "imagenet" not in str(dataset).lower():
            note = f"same models, but the paper's numbers are ImageNet and this is {dataset}"
        else:
            note = ""
        for m in _method_order(g["distiller"].tolist()):
            gm = g[g["distiller"] == m]
            b_mean, b_std = _stats(gm["best_top1"])
            l_mean, l_std = _stats(gm["last_top1"])
            adv, ep100 = PAPER_TABLE1[ref]["rows"].get(m, (float("nan"), float("nan")))
            rows.append({"study": _joined(g["study"].tolist()), "dataset": dataset, "student": student,
                         "teacher": teacher, "stage2_teacher": stage2, "method": m,
                         "method_name": METHOD_NAME.get(m, m), "n": int(gm["seed"].nunique()),
                         "best_top1_mean": b_mean, "best_top1_std": b_std, "last_top1_mean": l_mean,
                         "last_top1_std": l_std, "paper_pair": ref, "paper_advanced": adv,
                         "paper_100ep": ep100, "note": note})
    out = pd.DataFrame(rows)
    header = ["method", "ours best top-1", "ours last top-1", "n", "paper (advanced)", "paper (100 ep)"]
    md, tex = [f"# Table 1: top-1 accuracy (%) — study {study_dir.name}", ""], []
    for (dataset, student), g in out.groupby(["dataset", "student"], sort=False):
        r0 = g.iloc[0]
        s2 = f"; EffDstl stage 2 from {r0['stage2_teacher']}" if r0["stage2_teacher"] != "-" else ""
        title = f"{dataset}: student {student} from teacher {r0['teacher']}{s2}"
        body = [[r["method_name"], _pm(r["best_top1_mean"], r["best_top1_std"]),
                 _pm(r["last_top1_mean"], r["last_top1_std"]), r["n"], _num(r["paper_advanced"]),
                 _num(r["paper_100ep"])] for _, r in g.iterrows()]
        paper = f"paper: {PAPER_TABLE1[r0['paper_pair']]['dataset']} {r0['paper_pair'].replace('->', ' → ')}"
        md += [f"## {title}", "", markdown_table(header, body), "",
               f"ours: mean ± std over seeds (n); {paper}" + (f". Note: {r0['note']}." if r0["note"] else "."), ""]
        tex.append(latex_table(header, body, f"{title}. Ours: mean ± std over n seeds; {paper}"
                               + (f" ({r0['note']})" if r0["note"] else ""), f"tab:table1-{_squash(student)}"))
    return out, _write(_out(study_dir, out_dir), "table1", out, "\n".join(md), "\n".join(tex))


# -- Table 3 -------------------------------------------------------------------------------

def table3(study_dir: str | Path, out_dir: str | Path | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """Table 3: training cost per method: GPU-hours (sum over runs, mean per seed), wall seconds,
    devices, beside the paper's 97.7 RTX-3090 GPU-hours for EffDstl ResNet34 -> ResNet18.
    Teachers trained by the study appear as a last row, 'teacher training'."""
    study_dir = Path(study_dir)
    df = collect(study_dir)
    done = df[df["state"] == "done"]
    if done.empty:
        raise EffdstlError(f"no finished runs in {study_dir}: run the study before building Table 3")
    done = done.assign(_method=np.where(done["role"] == "teacher", "teacher training", done["distiller"]))
    order = _method_order([m for m in done["_method"] if m != "teacher training"])
    if (done["_method"] == "teacher training").any():
        order.append("teacher training")
    rows = []
    for m in order:
        g = done[done["_method"] == m]
        n_seeds = max(int(g["seed"].nunique()), 1)
        gh = g["gpu_hours"].fillna(0.0).astype(float)
        ws = g["wall_s"].astype(float)
        paper = PAPER_TABLE3 if m == PAPER_TABLE3["method"] else None
        rows.append({"method": m, "method_name": METHOD_NAME.get(m, m), "runs": len(g), "n": n_seeds,
                     "gpu_hours_total": float(gh.sum()), "gpu_hours_per_seed": float(gh.sum()) / n_seeds,
                     "wall_s_total": float(ws.sum()), "wall_s_per_seed": float(ws.sum()) / n_seeds,
                     "device": _joined([str(v) for v in g["device"].dropna()]),
                     "gpu_name": _joined([str(v) for v in g["gpu_name"].dropna()]),
                     "world_size": _joined([str(int(v)) for v in g["world_size"].dropna()]),
                     "paper_gpu_hours": paper["gpu_hours"] if paper else float("nan"),
                     "paper_device": paper["device"] if paper else "",
                     "note": (f"paper: EffDstl {paper['pair'].replace('->', ' → ')} on ImageNet (300 epochs)"
                              if paper else "")})
    out = pd.DataFrame(rows)
    header = ["method", "runs", "seeds", "GPU-h total", "GPU-h / seed", "wall s / seed", "device", "GPU",
              "paper GPU-h"]
    body = [[r["method_name"], r["runs"], r["n"], _num(r["gpu_hours_total"], 3), _num(r["gpu_hours_per_seed"], 3),
             _num(r["wall_s_per_seed"], 1), r["device"], r["gpu_name"],
             (f"{r['paper_gpu_hours']:g} ({r['paper_device']})" if r["paper_device"] else "-")]
            for _, r in out.iterrows()]
    note = (f"GPU-hours = wall hours × GPUs per run (0 on CPU); per seed = total / seeds. Paper: "
            f"{PAPER_TABLE3['gpu_hours']:g} {PAPER_TABLE3['device']} GPU-hours for EffDstl "
            f"{PAPER_TABLE3['pair'].replace('->', ' → ')} on ImageNet.")
    md = "\n".join([f"# Table 3: training cost — study {study_dir.name}", "",
                    markdown_table(header, body, ["l", "r", "r", "r", "r", "r", "l", "l", "r"]), "", note])
    tex = latex_table(header, body, f"Training cost, study {study_dir.name}. {note}", "tab:table3",
                      "lrrrrrllr")
    return out, _write(_out(study_dir, out_dir), "table3", out, md, tex)


# -- Table 4 -------------------------------------------------------------------------------

def _study_labels(study_dir: Path) -> list[str]:
    try:
        study = yaml.safe_load((study_dir / "study.yaml").read_text()) or {}
        return [str(a.get("label")) for a in study.get("ablations") or [] if isinstance(a, dict)]
    except (OSError, yaml.YAMLError, AttributeError):
        return []


def table4(study_dir: str | Path, out_dir: str | Path | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """Table 4: ablations, one row per meta.label (study.yaml's order, else the paper's), ours
    mean ± std of best/last top-1 and the difference to the first row."""
    study_dir = Path(study_dir)
    df, st = _done_students(study_dir, "Table 4")
    st = st[st["label"] != ""]
    if "ablation" in set(st["study_kind"]):
        st = st[st["study_kind"] == "ablation"]
    if st.empty:
        raise EffdstlError(f"no finished labelled runs in {study_dir}: run an ablation study first")
    labels = list(dict.fromkeys(st["label"]))
    pref = _study_labels(study_dir) or list(ABLATION_ORDER)
    labels = [x for x in pref if x in labels] + sorted(x for x in labels if x not in pref)
    rows = []
    for lab in labels:
        g = st[st["label"] == lab]
        b_mean, b_std = _stats(g["best_top1"])
        l_mean, l_std = _stats(g["last_top1"])
        params = [v for v in g["param"].dropna().unique()]
        rows.append({"label": lab, "n": int(g["seed"].nunique()), "best_top1_mean": b_mean, "best_top1_std": b_std,
                     "last_top1_mean": l_mean, "last_top1_std": l_std,
                     "param": params[0] if len(params) == 1 else (", ".join(map(str, params)) or None),
                     "subset": _joined(g["subset"].tolist()), "distiller": _joined(g["distiller"].tolist())})
    out = pd.DataFrame(rows)
    out["delta_best"] = out["best_top1_mean"] - out["best_top1_mean"].iloc[0]
    header = ["ablation", "ours best top-1", "ours last top-1", "n", "Δ best vs row 1"]
    body = [[r["label"], _pm(r["best_top1_mean"], r["best_top1_std"]), _pm(r["last_top1_mean"], r["last_top1_std"]),
             r["n"], "-" if i == 0 else f"{r['delta_best']:+.2f}"] for i, (_, r) in enumerate(out.iterrows())]
    md = "\n".join([f"# Table 4: ablations — study {study_dir.name} ({_joined(st['dataset'].tolist())}, "
                    f"student {_joined(st['student'].tolist())})", "", markdown_table(header, body), "",
                    "ours: top-1 % as mean ± std over seeds (n)."])
    tex = latex_table(header, body, f"Ablations, study {study_dir.name}: top-1 (%), mean ± std over seeds.",
                      "tab:table4")
    return out, _write(_out(study_dir, out_dir), "table4", out, md, tex)


TABLES = {"1": table1, "3": table3, "4": table4}
