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
from .files import atomic_write, atomic_write_text
from .effects import TEST_CHOSEN, effect_text, paired_difference
from .results import collect

METHODS = ("none", "kd", "rkd", "wsl", "effdstl")
METHOD_NAME = {"none": "no distill", "kd": "KD", "rkd": "RKD", "wsl": "WSL", "effdstl": "EffDstl",
               "ckm": "CKM", "replace": "replacement", "manipulate": "manipulation"}

# Table 1 of the paper (ImageNet, "advanced" schedule / "100 epochs, step decay"), docs/METHOD.md:
# top-1 and top-5 %, both as printed. The 100-epoch WSL and no-distill numbers are those the WSL
# authors publish for their released code (Table 1's "WSL" is the released WSL, distiller wsl_released).
PAPER_TABLE1: dict[str, dict[str, Any]] = {
    "ResNet34->ResNet18": {
        "teacher": "ResNet34", "student": "ResNet18", "dataset": "ImageNet",
        "rows": {"none": (72.30, 69.75), "kd": (72.90, 70.67), "rkd": (72.19, 70.40),
                 "wsl": (73.44, 72.04), "effdstl": (74.07, 72.17)},
        "top5": {"none": (90.84, 89.07), "kd": (91.18, 90.04), "rkd": (90.78, 89.78),
                 "wsl": (91.22, 90.70), "effdstl": (91.54, 90.95)}},
    "ResNet50->MobileNetV1": {
        "teacher": "ResNet50", "student": "MobileNetV1", "dataset": "ImageNet",
        "rows": {"none": (73.29, 68.87), "kd": (74.50, 70.49), "rkd": (74.08, 68.50),
                 "wsl": (74.78, 71.52), "effdstl": (75.49, 71.91)},
        "top5": {"none": (91.38, 88.76), "kd": (92.08, 89.92), "rkd": (91.74, 88.32),
                 "wsl": (91.89, 90.34), "effdstl": (92.32, 90.38)}},
}
REFERENCE_PAIR = "ResNet34->ResNet18"
# Table 3 of the paper as printed (ImageNet, RTX-3090 GPU-hours; docs/METHOD.md): method, student,
# top-1, GPU-hours (MEAL V2's "(+?)": the paper adds an unknown cost for MEAL V2's teachers).
PAPER_TABLE3_ROWS = (("MEAL V2", "MobileNet V3-Small 0.75", 67.60, "103.1 (+?)"),
                     ("MEAL V2", "ResNet18", 73.19, "110.2 (+?)"),
                     ("EffDstl", "MobileNet V3-Small 0.75", 67.34, "93.0"),
                     ("EffDstl", "ResNet18", 74.07, "97.7"),
                     ("EffDstl", "SKResNet18", 75.12, "127.3"),
                     ("EffDstl", "MobileNet V1", 75.49, "111.5"),
                     ("EffDstl", "ResNet34", 77.06, "160.8"))
# EffDstl GPU-hours per student, keyed by the squashed student name (the most specific key wins),
# with the source: the paper's Table 3, or the official repository's README (lsongx/EffDstl) for
# the three students the paper does not print.
PAPER_TABLE3_HOURS = {"resnet18": (97.7, "paper"), "mobilenetv1": (111.5, "paper"),
                      "mobilenetv3small075": (93.0, "paper"), "skresnet18": (127.3, "paper"),
                      "resnet34": (160.8, "paper"), "mobilenetv2": (130.1, "official README"),
                      "resnet18d": (114.0, "official README"), "resnet34d": (173.4, "official README")}
PAPER_TABLE3_NAMES = {"resnet18": "ResNet18", "mobilenetv1": "MobileNet V1",
                      "mobilenetv3small075": "MobileNet V3-Small 0.75", "mobilenetv2": "MobileNet V2",
                      "resnet18d": "ResNet18d", "skresnet18": "SKResNet18", "resnet34": "ResNet34",
                      "resnet34d": "ResNet34d"}
PAPER_TABLE3 = {"method": "effdstl", "pair": REFERENCE_PAIR, "gpu_hours": 97.7, "device": "RTX 3090"}
# Which study kinds each table can show (anything else: one line, exit 2).
TABLE_STUDY_KINDS = {"table1": ("recipe",), "table3": ("recipe",), "table4": ("ablation",)}

def paper_table3_hours(student: str) -> tuple[float, str, str] | None:
    """EffDstl's GPU-hours for this student model spec, if given: (hours, name, source), the
    source being the paper's Table 3 or the official README."""
    s = _squash(student.split(":")[-1].split(".")[0])
    s = s.replace("tf", "", 1) if s.startswith("tfmobilenet") else s
    for key in sorted(PAPER_TABLE3_HOURS, key=len, reverse=True):
        if s.startswith(key):
            if key == "resnet18" and s.startswith("resnet18d"):
                continue
            hours, source = PAPER_TABLE3_HOURS[key]
            return hours, PAPER_TABLE3_NAMES[key], source
    return None


def require_study_kind(study_dir: Path, which: str, kinds_present: set[str]) -> None:
    """A table refuses a study it cannot show: one line naming the kinds it accepts."""
    ok = TABLE_STUDY_KINDS[which]
    kinds = sorted(k for k in kinds_present if k and k != "teacher")
    if kinds and not set(kinds) & set(ok):
        raise EffdstlError(f"{which} shows {' or '.join(ok)} studies; study {study_dir.name} is of kind "
                           f"{', '.join(kinds)} (use {', '.join(w for w, k in TABLE_STUDY_KINDS.items() if set(k) & set(kinds)) or 'effdstl plot'} for it)")


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


def _study_kind_checked(study_dir: Path, which: str, what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    df = collect(study_dir)
    require_study_kind(study_dir, which, set(df["study_kind"].dropna()))
    st = df[(df["role"] == "student") & (df["state"] == "done") & df["study_kind"].isin(TABLE_STUDY_KINDS[which])]
    if st.empty:
        n = int((df["role"] == "student").sum())
        raise EffdstlError(f"no finished student runs in {study_dir} ({n} planned or unfinished): "
                           f"run the study before building {what}")
    return df, st


def _row_order(g: pd.DataFrame) -> list[str]:
    """Labels in the paper's method order (none, KD, RKD, WSL, EffDstl), then any other label."""
    first = {}
    for _, r in g.iterrows():
        first.setdefault(r["label"], r["distiller"])
    rank = {m: i for i, m in enumerate(METHODS)}
    return sorted(first, key=lambda lab: (rank.get(first[lab], len(METHODS)), lab))


def _paper_col(setting: str) -> str:
    """Which of the paper's Table 1 columns a setting stands beside: a setting named for steps or
    100 epochs the "100 epochs, step decay" one, any other the advanced schedule."""
    return "100ep" if re.search(r"100|step", str(setting)) else "advanced"


def _settings_order(study_dir: Path, present: list[str]) -> list[str]:
    """The study's settings in the order its file lists them (then any others)."""
    try:
        study = yaml.safe_load((study_dir / "study.yaml").read_text()) or {}
        names = [str(x.get("name", "")) for x in study.get("settings") or [] if isinstance(x, dict)]
    except (OSError, yaml.YAMLError, AttributeError):
        names = []
    present = list(dict.fromkeys(present))
    return [n for n in names if n in present] + [n for n in present if n not in names]


# -- Table 1 -------------------------------------------------------------------------------

def table1(study_dir: str | Path, out_dir: str | Path | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """Table 1: no distill / KD / RKD / WSL / EffDstl, ours (mean ± std over seeds of the final
    epoch's top-1 and top-5; the best epoch's top-1, chosen on the test set, beside) next to the
    paper's top-1 and top-5 (advanced schedule / 100 epochs, docs/METHOD.md).

    One block per (dataset, student, stage-1 teacher, setting); rows are keyed by the run's label,
    never merged across labels. Pairs that are not the paper's get the paper's ResNet34->ResNet18
    numbers as a reference, with a note that the setting differs. Recipe studies only.
    """
    study_dir = Path(study_dir)
    df, st = _study_kind_checked(study_dir, "table1", "Table 1")
    st = st.assign(_t1=[w if w else "" for w in st["weak"]])
    # no-distill runs have no teacher: they belong to the block of their (pair, setting, student)
    key_cols = ["dataset", "student", "pair", "setting"]
    order = {n: i for i, n in enumerate(_settings_order(study_dir, st["setting"].tolist()))}
    st = st.assign(_order=st["setting"].map(order)).sort_values(["_order"], kind="stable")
    rows: list[dict[str, Any]] = []
    for (dataset, student, pair, setting), g in st.groupby(key_cols, sort=False):
        teacher = _joined([w for w in g["weak"].tolist() if w])
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
        for lab in _row_order(g):
            gm = g[g["label"] == lab]
            m = gm["distiller"].iloc[0]
            b_mean, b_std = _stats(gm["best_top1"])
            l_mean, l_std = _stats(gm["last_top1"])
            t5_mean, t5_std = _stats(gm["best_top5"])
            l5_mean, l5_std = _stats(gm["last_top5"])
            adv, ep100 = PAPER_TABLE1[ref]["rows"].get(m, (float("nan"), float("nan")))
            adv5, ep100_5 = PAPER_TABLE1[ref]["top5"].get(m, (float("nan"), float("nan")))
            rows.append({"study": _joined(g["study"].tolist()), "dataset": dataset, "student": student,
                         "teacher": teacher, "stage2_teacher": stage2, "pair": pair, "setting": setting,
                         "label": lab, "method": m, "method_name": METHOD_NAME.get(lab, lab),
                         "n": int(gm["seed"].nunique()),
                         "best_top1_mean": b_mean, "best_top1_std": b_std, "last_top1_mean": l_mean,
                         "last_top1_std": l_std, "best_top5_mean": t5_mean, "best_top5_std": t5_std,
                         "last_top5_mean": l5_mean, "last_top5_std": l5_std,
                         "paper_pair": ref, "paper_advanced": adv, "paper_100ep": ep100,
                         "paper_top5_advanced": adv5, "paper_top5_100ep": ep100_5,
                         "paper_column": _paper_col(setting), "note": note})
    out = pd.DataFrame(rows)
    header = ["method", "ours top-1", "ours top-5", f"ours best top-1 ({TEST_CHOSEN})", "n",
              "paper top-1 (advanced)", "paper top-5 (advanced)", "paper top-1 (100 ep)", "paper top-5 (100 ep)"]
    md, tex = [f"# Table 1: accuracy (%) — study {study_dir.name}", ""], []
    for (dataset, student, pair, setting), g in out.groupby(["dataset", "student", "pair", "setting"], sort=False):
        r0 = g.iloc[0]
        s2 = f"; stage 2 from {r0['stage2_teacher']}" if r0["stage2_teacher"] != "-" else ""
        sett = f" — setting {setting}" if setting else ""
        title = f"{dataset}: student {student} from teacher {r0['teacher']}{s2}{sett}"
        body = [[r["method_name"], _pm(r["last_top1_mean"], r["last_top1_std"]),
                 _pm(r["last_top5_mean"], r["last_top5_std"]), _pm(r["best_top1_mean"], r["best_top1_std"]),
                 r["n"], _num(r["paper_advanced"]), _num(r["paper_top5_advanced"]), _num(r["paper_100ep"]),
                 _num(r["paper_top5_100ep"])] for _, r in g.iterrows()]
        col = "advanced" if r0["paper_column"] == "advanced" else "100 ep"
        paper = (f"paper: {PAPER_TABLE1[r0['paper_pair']]['dataset']} {r0['paper_pair'].replace('->', ' → ')}, "
                 f"top-1 and top-5 as printed (the column this setting matches: {col}); its WSL is the WSL "
                 f"authors' released loss, as ours (wsl_released)")
        md += [f"## {title}", "", markdown_table(header, body), "",
               f"ours: the final epoch's accuracy, mean ± std over seeds (n); the best epoch's is {TEST_CHOSEN} "
               f"(optimistic, and in the two-stage recipe it can be a stage-1 epoch); {paper}"
               + (f". Note: {r0['note']}." if r0["note"] else "."), ""]
        tex.append(latex_table(header, body, f"{title}. Ours: mean ± std over n seeds; {paper}"
                               + (f" ({r0['note']})" if r0["note"] else ""),
                               f"tab:table1-{_squash(student)}-{_squash(setting)}"))
    return out, _write(_out(study_dir, out_dir), "table1", out, "\n".join(md), "\n".join(tex))


# -- Table 3 -------------------------------------------------------------------------------

def table3(study_dir: str | Path, out_dir: str | Path | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """Table 3: training cost per student and method, beside the paper's EffDstl GPU-hours for
    that student (official README numbers, RTX 3090, ImageNet 300 epochs).

    A run trained inside a group job records its *share* of the job (the shared data stream and
    teacher forwards split between the job's runs, plus its own evaluation): the runs of a job add
    up to the job. The table shows the share per seed and, beside it, the whole group job's cost
    per seed. Teachers trained by the study appear as a last row, 'teacher training'.
    """
    study_dir = Path(study_dir)
    df = collect(study_dir)
    require_study_kind(study_dir, "table3", set(df["study_kind"].dropna()))
    done = df[(df["state"] == "done") & (df["study_kind"].isin(TABLE_STUDY_KINDS["table3"]) | (df["role"] == "teacher"))]
    if done.empty:
        raise EffdstlError(f"no finished runs in {study_dir}: run the study before building Table 3")
    job_gh = done.groupby("group")["gpu_hours"].apply(lambda v: float(v.fillna(0).sum())).to_dict()
    job_ws = done.groupby("group")["wall_s"].apply(lambda v: float(v.fillna(0).sum())).to_dict()
    done = done.assign(_method=np.where(done["role"] == "teacher", "teacher training", done["distiller"]),
                       _label=np.where(done["role"] == "teacher", "teacher training", done["label"]))
    rows = []
    order = {n: i for i, n in enumerate(_settings_order(study_dir, done["setting"].tolist()))}
    st = done[done["role"] != "teacher"]
    st = st.assign(_order=st["setting"].map(order)).sort_values(["_order"], kind="stable")
    blocks = [(s, g) for s, g in st.groupby(["student", "setting"], sort=False)]
    if (done["role"] == "teacher").any():
        blocks.append((("(teachers)", ""), done[done["role"] == "teacher"]))
    for (student, setting), gb in blocks:
        labels = ["teacher training"] if student == "(teachers)" else _row_order(gb)
        for lab in labels:
            g = gb[gb["_label"] == lab]
            m = g["_method"].iloc[0]
            n_seeds = max(int(g["seed"].nunique()), 1)
            gh = g["gpu_hours"].fillna(0.0).astype(float)
            ws = g["wall_s"].astype(float)
            groups = [x for x in dict.fromkeys(g["group"]) if x]
            whole_gh = sum(job_gh.get(x, 0.0) for x in groups) / n_seeds if groups else float("nan")
            whole_ws = sum(job_ws.get(x, 0.0) for x in groups) / n_seeds if groups else float("nan")
            paper = paper_table3_hours(student) if m == "effdstl" else None
            rows.append({"student": student, "setting": setting, "label": lab, "method": m,
                         "method_name": METHOD_NAME.get(lab, lab), "runs": len(g), "n": n_seeds,
                         "gpu_hours_total": float(gh.sum()), "gpu_hours_per_seed": float(gh.sum()) / n_seeds,
                         "job_gpu_hours_per_seed": whole_gh,
                         "wall_s_total": float(ws.sum()), "wall_s_per_seed": float(ws.sum()) / n_seeds,
                         "job_wall_s_per_seed": whole_ws,
                         "device": _joined([str(v) for v in g["device"].dropna()]),
                         "gpu_name": _joined([str(v) for v in g["gpu_name"].dropna()]),
                         "world_size": _joined([str(int(v)) for v in g["world_size"].dropna()]),
                         "paper_gpu_hours": paper[0] if paper else float("nan"),
                         "paper_device": PAPER_TABLE3["device"] if paper else "",
                         "paper_source": paper[2] if paper else "",
                         "note": f"{paper[2]}: EffDstl {paper[1]} on ImageNet (300 epochs)" if paper else ""})
    out = pd.DataFrame(rows)
    header = ["student", "method", "runs", "seeds", "GPU-h/seed share", "GPU-h/seed job",
              "wall s/seed share", "wall s/seed job", "device", "GPU", "paper GPU-h"]
    body = [[r["student"] + (f" [{r['setting']}]" if r["setting"] else ""), r["method_name"], r["runs"], r["n"],
             _num(r["gpu_hours_per_seed"], 3), _num(r["job_gpu_hours_per_seed"], 3), _num(r["wall_s_per_seed"], 1),
             _num(r["job_wall_s_per_seed"], 1), r["device"], r["gpu_name"],
             (f"{r['paper_gpu_hours']:g} ({r['paper_device']}; {r['paper_source']})" if r["paper_device"] else "-")]
            for _, r in out.iterrows()]
    note = ("'share': each run's share of its group job (the job's shared data stream and teacher forwards "
            "split between its runs, plus the run's own evaluation; a job's runs add up to the job); "
            "'job': the whole group job that trained it. GPU-hours = wall hours × GPUs (0 on CPU); per "
            "seed = total / seeds. 'paper GPU-h': EffDstl's cost for that student on ImageNet, RTX 3090, from the "
            "paper's Table 3 or, for MobileNet V2 (130.1), ResNet18d (114.0) and ResNet34d (173.4), from the "
            "official repository's README (not the paper); the paper gives no cost for KD, RKD or WSL.")
    paper_body = [[m, st_, f"{t1:.2f}", h] for m, st_, t1, h in PAPER_TABLE3_ROWS]
    paper_md = ["## The paper's Table 3, as printed (ImageNet, RTX-3090 GPU-hours)", "",
                markdown_table(["method", "student", "top-1", "GPU-hours"], paper_body, ["l", "l", "r", "r"]), "",
                "MEAL V2's \"(+?)\": the paper adds the cost of MEAL V2's teachers as unknown."]
    md = "\n".join([f"# Table 3: training cost — study {study_dir.name}", "",
                    markdown_table(header, body, ["l", "l", "r", "r", "r", "r", "r", "r", "l", "l", "r"]), "", note, "",
                    *paper_md])
    tex = latex_table(header, body, f"Training cost, study {study_dir.name}. {note}", "tab:table3",
                      "llrrrrrrllr")
    return out, _write(_out(study_dir, out_dir), "table3", out, md, tex)


# -- Table 4 -------------------------------------------------------------------------------

# The paper's Table 4 as printed (docs/METHOD.md 'Table 4'), row by row, with its letters and meanings:
# (part, the study label that stands for the row, the paper's student, what the row varies, the
# paper's top-1, the row it is read against). A row the paper shows under two parts (the default
# tau 0.7 of (d), CKM on of (e)) is the same run, listed again.
PAPER_TABLE4 = (
    ("a", "(a) ResNet34 -> ResNet34d", "MobileNet V3-Small 0.75", "ResNet34 (73.31) → ResNet34d (77.12)", 67.34, None),
    ("a", "(a) MobileNet V2 -> ResNet34d", "MobileNet V3-Small 0.75", "MobileNet V2 (72.97) → ResNet34d", 66.63,
     "(a) ResNet34 -> ResNet34d"),
    ("a", "(a) ResNet34 -> MobileNet V3-Large", "MobileNet V3-Small 0.75", "ResNet34 → MobileNet V3-Large (75.52)",
     67.52, "(a) ResNet34 -> ResNet34d"),
    ("a", "(a) MobileNet V2 -> MobileNet V3-Large", "MobileNet V3-Small 0.75", "MobileNet V2 → MobileNet V3-Large",
     67.18, "(a) ResNet34 -> MobileNet V3-Large"),
    ("c", "(c) switch, ResNet18", "ResNet18", "change teacher: yes", 74.07, None),
    ("c", "(c) no switch, MobileNet V1", "MobileNet V1", "change teacher: no", 74.52, None),
    ("c", "(c) switch, MobileNet V1", "MobileNet V1", "change teacher: yes", 75.49, "(c) no switch, MobileNet V1"),
    ("d", "(c) switch, ResNet18", "ResNet18", "τ 0.7 (the default: (c)'s row)", 74.07, None),
    ("d", "(d) tau 0.8, ResNet18", "ResNet18", "τ 0.8", 74.24, "(c) switch, ResNet18"),
    ("d", "(c) switch, MobileNet V1", "MobileNet V1", "τ 0.7 (the default: (c)'s row)", 75.49, None),
    ("d", "(d) tau 1.0, MobileNet V1", "MobileNet V1", "τ 1.0", 74.52, "(c) switch, MobileNet V1"),
    ("d", "(d) tau 0.8, MobileNet V1", "MobileNet V1", "τ 0.8", 75.46, "(c) switch, MobileNet V1"),
    ("e", "(c) switch, MobileNet V1", "MobileNet V1", "CKM: yes ((c)'s row)", 75.49, None),
    ("e", "(e) CKM off, ResNet34d", "ResNet34d", "CKM: no", 75.58, None),
    ("e", "(e) CKM on, ResNet34d", "ResNet34d", "CKM: yes", 77.62, "(e) CKM off, ResNet34d"),
)
# (b): EffDstl's students continued with MEAL V2 (top-1 before -> after, top-5 before -> after)
PAPER_TABLE4_B = (("MobileNet V2", 74.45, 74.76, 91.74, 92.03), ("ResNet18", 74.07, 74.46, 91.54, 91.61),
                  ("ResNet18d", 74.98, 75.16, 91.97, 92.17), ("SKResNet18", 75.12, 75.32, 92.14, 92.24))
ABLATION_PARTS = {"a": "(a) teachers: stage-1 → stage-2 teacher (MobileNet V3-Small 0.75 student)",
                  "b": "(b) continuing with MEAL V2",
                  "c": "(c) two-stage training: changing the teacher in stage 2",
                  "d": "(d) the stage-2 temperature τ",
                  "e": "(e) consistent knowledge mining (CKM)"}
PART_B_NOTE = ("(b) continuing EffDstl's students with MEAL V2 is not run: MEAL V2's training (an ensemble "
               "of teachers and a discriminator) is not part of effdstl.")


def _study_labels(study_dir: Path) -> list[str]:
    try:
        study = yaml.safe_load((study_dir / "study.yaml").read_text()) or {}
        return [str(a.get("label")) for a in study.get("ablations") or [] if isinstance(a, dict)]
    except (OSError, yaml.YAMLError, AttributeError):
        return []


def _per_seed(g: pd.DataFrame, metric: str = "last_top1") -> dict[int, float]:
    return {int(sd): float(v) for sd, v in zip(g["seed"], g[metric]) if v == v}


def table4(study_dir: str | Path, out_dir: str | Path | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """Table 4 with the paper's letters, rows and numbers (``PAPER_TABLE4``): (a) teacher pairs,
    (b) MEAL V2 (not run, with the paper's numbers), (c) the teacher switch, (d) the stage-2 τ,
    (e) CKM. Per row: the paper's student and top-1, our student and teachers, our final-epoch
    top-1 (mean ± std over seeds), and, where the paper reads the row against another, both
    differences (ours seed-paired, with its 95 % interval). Rows of the study that are none of
    the paper's are listed after, against the study's first row. Ablation studies only."""
    study_dir = Path(study_dir)
    df, st = _study_kind_checked(study_dir, "table4", "Table 4")
    st = st[st["label"] != ""]
    if st.empty:
        raise EffdstlError(f"no finished labelled runs in {study_dir}: run an ablation study first")
    labels = list(dict.fromkeys(st["label"]))
    pref = _study_labels(study_dir)
    labels = [x for x in pref if x in labels] + [x for x in labels if x not in pref]

    def ours(lab: str) -> dict[str, Any]:
        g = st[st["label"] == lab]
        l_mean, l_std = _stats(g["last_top1"])
        b_mean, b_std = _stats(g["best_top1"])
        return {"student": _joined(g["student"].tolist()), "teacher1": _joined(g["weak"].tolist()),
                "teacher2": _joined(g["strong"].tolist()), "n": int(g["seed"].nunique()),
                "last_top1_mean": l_mean, "last_top1_std": l_std, "best_top1_mean": b_mean, "best_top1_std": b_std,
                "subset": _joined(g["subset"].tolist()), "param": _joined([str(v) for v in g["param"].dropna()])}

    rows = []
    paper_labels = {r[1] for r in PAPER_TABLE4}
    for part, lab, p_student, p_row, p_top1, vs in PAPER_TABLE4:
        p_vs = next((r[4] for r in PAPER_TABLE4 if r[1] == vs), float("nan")) if vs else float("nan")
        row = {"part": part, "label": lab, "paper_student": p_student, "paper_row": p_row, "paper_top1": p_top1,
               "versus": vs or "", "paper_delta": p_top1 - p_vs if vs else float("nan"), "run": lab in labels}
        if lab in labels:
            row.update(ours(lab))
            if vs and vs in labels:
                d = paired_difference(_per_seed(st[st["label"] == lab]), _per_seed(st[st["label"] == vs]))
                row.update(delta=d["diff"], delta_low=d["ci_low"], delta_high=d["ci_high"], delta_n=d["n"],
                           delta_text=effect_text(d))
        rows.append(row)
    others = [lab for lab in labels if lab not in paper_labels]
    for lab in others:   # a study's own variants: against its first row
        row = {"part": "", "label": lab, "paper_student": "", "paper_row": "", "paper_top1": float("nan"),
               "versus": labels[0] if lab != labels[0] else "", "paper_delta": float("nan"), "run": True, **ours(lab)}
        if lab != labels[0]:
            d = paired_difference(_per_seed(st[st["label"] == lab]), _per_seed(st[st["label"] == labels[0]]))
            row.update(delta=d["diff"], delta_low=d["ci_low"], delta_high=d["ci_high"], delta_n=d["n"],
                       delta_text=effect_text(d))
        rows.append(row)
    out = pd.DataFrame(rows)
    for c in ("student", "teacher1", "teacher2", "n", "last_top1_mean", "last_top1_std", "best_top1_mean",
              "best_top1_std", "delta", "delta_low", "delta_high", "delta_n", "delta_text"):
        if c not in out.columns:
            out[c] = None
    header = ["paper row", "paper student", "paper top-1", "paper Δ", "our student", "our teachers",
              "ours top-1", "n", "ours Δ (seed-paired, 95 % CI)"]

    def line(r) -> list[str]:
        if not r["run"]:
            return [r["paper_row"], r["paper_student"], _num(r["paper_top1"]),
                    f"{r['paper_delta']:+.2f}" if r["versus"] else "", "not run in this study", "", "-", "", ""]
        t2 = r["teacher2"] if r["teacher2"] not in ("-", None) else r["teacher1"]
        return [r["paper_row"] or r["label"], r["paper_student"] or "-", _num(r["paper_top1"]),
                f"{r['paper_delta']:+.2f}" if r["versus"] and r["paper_delta"] == r["paper_delta"] else "",
                r["student"], f"{r['teacher1']} → {t2}", _pm(r["last_top1_mean"], r["last_top1_std"]), r["n"],
                (r["delta_text"] or "") if r["versus"] else "—"]

    dataset = _joined(st["dataset"].tolist())
    md = [f"# Table 4: ablations — study {study_dir.name} ({dataset})", "",
          "The paper's rows (ImageNet top-1 %, as printed) beside ours: our top-1 is the final epoch's, mean ± std "
          "over seeds (n); Δ is the row minus the row the paper reads it against (the row above it in its part, "
          "named in the CSV's `versus`). Our small networks stand for the paper's named in the first columns.", ""]
    tex_rows = []
    for part in ("a", "b", "c", "d", "e"):
        title = ABLATION_PARTS[part]
        if part == "b":
            body_b = [[stu, f"{b1:.2f} → {a1:.2f}", f"{b5:.2f} → {a5:.2f}"] for stu, b1, a1, b5, a5 in PAPER_TABLE4_B]
            md += [f"## {title}", "", PART_B_NOTE, "", "The paper's numbers (top-1 and top-5, before → after):", "",
                   markdown_table(["student", "top-1", "top-5"], body_b), ""]
            tex_rows += [[title] + [""] * (len(header) - 1)]
            continue
        g = out[out["part"] == part]
        body = [line(r) for _, r in g.iterrows()]
        md += [f"## {title}", "", markdown_table(header, body), ""]
        tex_rows += [[title] + [""] * (len(header) - 1)] + body
    if others:
        g = out[out["part"] == ""]
        body = [line(r) for _, r in g.iterrows()]
        md += ["## other variants of this study (not rows of the paper)", "", markdown_table(header, body), ""]
        tex_rows += [["other variants"] + [""] * (len(header) - 1)] + body
    md += [f"The best epoch's top-1 ({TEST_CHOSEN}) is in table4.csv (`best_top1_mean`), never in a comparison."]
    tex = latex_table(header, tex_rows, f"Ablations, study {study_dir.name}: the paper's Table 4 beside ours "
                      f"(final-epoch top-1, mean ± std over seeds). {PART_B_NOTE}", "tab:table4",
                      "l" * 2 + "r" * 2 + "l" * 2 + "r" * 3)
    return out, _write(_out(study_dir, out_dir), "table4", out, "\n".join(md), tex)


TABLES = {"1": table1, "3": table3, "4": table4}
