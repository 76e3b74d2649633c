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
# Training cost of EffDstl per student, ImageNet, RTX-3090 GPU-hours: the official repository's
# README (lsongx/EffDstl), whose ResNet18 number (97.7) is the one docs/METHOD.md quotes from
# the paper's text. Keyed by the squashed student name; the most specific key wins.
PAPER_TABLE3_HOURS = {"resnet18": 97.7, "mobilenetv1": 111.5, "mobilenetv3small075": 93.0,
                      "mobilenetv2": 130.1, "resnet18d": 114.0, "skresnet18": 127.3, "resnet34": 160.8,
                      "resnet34d": 173.4}
PAPER_TABLE3_NAMES = {"resnet18": "ResNet18", "mobilenetv1": "MobileNet V1",
                      "mobilenetv3small075": "MobileNet V3-Small 0.75", "mobilenetv2": "MobileNet V2",
                      "resnet18d": "ResNet18d", "skresnet18": "SKResNet18", "resnet34": "ResNet34",
                      "resnet34d": "ResNet34d"}
PAPER_TABLE3 = {"method": "effdstl", "pair": REFERENCE_PAIR, "gpu_hours": 97.7, "device": "RTX 3090"}
# Which study kinds each table can show (anything else: one line, exit 2).
TABLE_STUDY_KINDS = {"table1": ("recipe",), "table3": ("recipe",), "table4": ("ablation",)}
ABLATION_ORDER = ("EffDstl (switch, tau 0.7, CKM)", "teacher switch", "no teacher switch", "tau 0.7",
                  "tau 0.8", "tau 1.0", "CKM on", "CKM off")
ABLATION_PARTS = {"a": "(a) teacher pairs: stage-1 → stage-2 teacher",
                  "b": "(b) continuing with MEAL V2",
                  "c": "(c) stage-2 temperature τ_t",
                  "d": "(d) consistent knowledge mining (CKM) on / off",
                  "e": "(e) changing the teacher in stage 2 or not"}
PART_B_NOTE = ("(b) continuing with MEAL V2 is left out: it needs MEAL V2's trained models from outside "
               "this project.")


def paper_table3_hours(student: str) -> tuple[float, str] | None:
    """The paper's (official README's) EffDstl GPU-hours for this student model spec, if given."""
    s = _squash(student.split(":")[-1].split(".")[0])
    s = s.replace("tf", "", 1) if s.startswith("tfmobilenet") else s
    for key in sorted(PAPER_TABLE3_HOURS, key=len, reverse=True):
        if s.startswith(key):
            if key == "resnet18" and s.startswith("resnet18d"):
                continue
            return PAPER_TABLE3_HOURS[key], PAPER_TABLE3_NAMES[key]
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
    """Table 1: no distill / KD / RKD / WSL / EffDstl, ours (mean ± std over seeds of best and last
    top-1, best top-5) beside the paper's top-1 (advanced schedule / 100 epochs, docs/METHOD.md).

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
            adv, ep100 = PAPER_TABLE1[ref]["rows"].get(m, (float("nan"), float("nan")))
            rows.append({"study": _joined(g["study"].tolist()), "dataset": dataset, "student": student,
                         "teacher": teacher, "stage2_teacher": stage2, "pair": pair, "setting": setting,
                         "label": lab, "method": m, "method_name": METHOD_NAME.get(lab, lab),
                         "n": int(gm["seed"].nunique()),
                         "best_top1_mean": b_mean, "best_top1_std": b_std, "last_top1_mean": l_mean,
                         "last_top1_std": l_std, "best_top5_mean": t5_mean, "best_top5_std": t5_std,
                         "paper_pair": ref, "paper_advanced": adv, "paper_100ep": ep100,
                         "paper_column": _paper_col(setting), "note": note})
    out = pd.DataFrame(rows)
    header = ["method", "ours best top-1", "ours last top-1", "ours best top-5", "n",
              "paper top-1 (advanced)", "paper top-1 (100 ep)"]
    md, tex = [f"# Table 1: accuracy (%) — study {study_dir.name}", ""], []
    for (dataset, student, pair, setting), g in out.groupby(["dataset", "student", "pair", "setting"], sort=False):
        r0 = g.iloc[0]
        s2 = f"; stage 2 from {r0['stage2_teacher']}" if r0["stage2_teacher"] != "-" else ""
        sett = f" — setting {setting}" if setting else ""
        title = f"{dataset}: student {student} from teacher {r0['teacher']}{s2}{sett}"
        body = [[r["method_name"], _pm(r["best_top1_mean"], r["best_top1_std"]),
                 _pm(r["last_top1_mean"], r["last_top1_std"]), _pm(r["best_top5_mean"], r["best_top5_std"]),
                 r["n"], _num(r["paper_advanced"]), _num(r["paper_100ep"])] for _, r in g.iterrows()]
        col = "advanced" if r0["paper_column"] == "advanced" else "100 ep"
        paper = (f"paper: {PAPER_TABLE1[r0['paper_pair']]['dataset']} {r0['paper_pair'].replace('->', ' → ')}, "
                 f"top-1 only (the column this setting matches: {col})")
        md += [f"## {title}", "", markdown_table(header, body), "",
               f"ours: mean ± std over seeds (n); {paper}" + (f". Note: {r0['note']}." if r0["note"] else "."), ""]
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
                         "note": f"paper: EffDstl {paper[1]} on ImageNet (300 epochs)" if paper else ""})
    out = pd.DataFrame(rows)
    header = ["student", "method", "runs", "seeds", "GPU-h/seed share", "GPU-h/seed job",
              "wall s/seed share", "wall s/seed job", "device", "GPU", "paper GPU-h"]
    body = [[r["student"] + (f" [{r['setting']}]" if r["setting"] else ""), r["method_name"], r["runs"], r["n"],
             _num(r["gpu_hours_per_seed"], 3), _num(r["job_gpu_hours_per_seed"], 3), _num(r["wall_s_per_seed"], 1),
             _num(r["job_wall_s_per_seed"], 1), r["device"], r["gpu_name"],
             (f"{r['paper_gpu_hours']:g} ({r['paper_device']})" if r["paper_device"] else "-")]
            for _, r in out.iterrows()]
    note = ("'share': each run's share of its group job (the job's shared data stream and teacher forwards "
            "split between its runs, plus the run's own evaluation; a job's runs add up to the job); "
            "'job': the whole group job that trained it. GPU-hours = wall hours × GPUs (0 on CPU); per "
            "seed = total / seeds. Paper: EffDstl's training cost per student on ImageNet, RTX 3090 GPU-hours "
            "(ResNet18 97.7, MobileNet V1 111.5, MobileNet V3-Small 0.75 93.0, MobileNet V2 130.1, ResNet18d "
            "114.0, SKResNet18 127.3, ResNet34 160.8, ResNet34d 173.4; the official README); the paper gives "
            "no cost for the baselines.")
    md = "\n".join([f"# Table 3: training cost — study {study_dir.name}", "",
                    markdown_table(header, body, ["l", "l", "r", "r", "r", "r", "r", "r", "l", "l", "r"]), "", note])
    tex = latex_table(header, body, f"Training cost, study {study_dir.name}. {note}", "tab:table3",
                      "llrrrrrrllr")
    return out, _write(_out(study_dir, out_dir), "table3", out, md, tex)


# -- Table 4 -------------------------------------------------------------------------------

def _study_labels(study_dir: Path) -> list[str]:
    try:
        study = yaml.safe_load((study_dir / "study.yaml").read_text()) or {}
        return [str(a.get("label")) for a in study.get("ablations") or [] if isinstance(a, dict)]
    except (OSError, yaml.YAMLError, AttributeError):
        return []


def _paper_table4(label: str, part: str, student: str, dataset: str, is_ref: bool) -> tuple[float, str]:
    """The paper's number for an ablation row, where our reference gives it; else NaN and why."""
    if is_ref and "imagenet" in str(dataset).lower() and paper_pair(student, "resnet34") == REFERENCE_PAIR:
        return PAPER_TABLE1[REFERENCE_PAIR]["rows"]["effdstl"][0], "Table 1's EffDstl"
    return float("nan"), "not in our reference"


def table4(study_dir: str | Path, out_dir: str | Path | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """Table 4: ablations by part — (a) teacher pairs, (c) stage-2 τ, (d) CKM on/off, (e) teacher
    switch — one row per run label (never merged), ours mean ± std of best/last top-1, the
    difference to the part's reference row, and the paper's number where docs/METHOD.md or the
    official code gives it ('-' and a note where it does not). (b) MEAL V2 is left out and says so.
    Ablation studies only."""
    study_dir = Path(study_dir)
    df, st = _study_kind_checked(study_dir, "table4", "Table 4")
    st = st[st["label"] != ""]
    if st.empty:
        raise EffdstlError(f"no finished labelled runs in {study_dir}: run an ablation study first")
    labels = list(dict.fromkeys(st["label"]))
    pref = _study_labels(study_dir) or list(ABLATION_ORDER)
    labels = [x for x in pref if x in labels] + sorted(x for x in labels if x not in pref)
    ref_label = labels[0]
    rows = []
    for lab in labels:
        g = st[st["label"] == lab]
        b_mean, b_std = _stats(g["best_top1"])
        l_mean, l_std = _stats(g["last_top1"])
        params = [v for v in g["param"].dropna().unique()]
        part = _joined(g["part"].tolist()) if "part" in g else "-"
        student = _joined(g["student"].tolist())
        pv, src = _paper_table4(lab, part, student, _joined(g["dataset"].tolist()), lab == ref_label)
        rows.append({"label": lab, "part": "" if part == "-" else part, "student": student,
                     "teacher1": _joined(g["weak"].tolist()), "teacher2": _joined(g["strong"].tolist()) ,
                     "n": int(g["seed"].nunique()), "best_top1_mean": b_mean, "best_top1_std": b_std,
                     "last_top1_mean": l_mean, "last_top1_std": l_std,
                     "param": params[0] if len(params) == 1 else (", ".join(map(str, params)) or None),
                     "subset": _joined(g["subset"].tolist()), "distiller": _joined(g["distiller"].tolist()),
                     "paper_top1": pv, "paper_source": src})
    out = pd.DataFrame(rows)
    out["delta_best"] = out["best_top1_mean"] - out["best_top1_mean"].iloc[0]
    header = ["ablation", "student", "stage-1 → stage-2 teacher", "ours best top-1", "ours last top-1", "n",
              "Δ best vs reference", "paper top-1"]

    def line(r, base):
        t2 = r["teacher2"] if r["teacher2"] != "-" else r["teacher1"]
        delta = "reference" if r["label"] == base["label"] else f"{r['best_top1_mean'] - base['best_top1_mean']:+.2f}"
        return [r["label"], r["student"], f"{r['teacher1']} → {t2}", _pm(r["best_top1_mean"], r["best_top1_std"]),
                _pm(r["last_top1_mean"], r["last_top1_std"]), r["n"], delta,
                _num(r["paper_top1"]) if math.isfinite(r["paper_top1"]) else "-"]

    ref = out.iloc[0]
    parts = [p for p in ("a", "c", "d", "e") if (out["part"] == p).any()]
    others = out[~out["part"].isin(["a", "c", "d", "e"])]
    md = [f"# Table 4: ablations — study {study_dir.name} ({_joined(st['dataset'].tolist())})", ""]
    tex_rows = []
    sections = [(p, ABLATION_PARTS[p], out[out["part"] == p]) for p in parts]
    if len(others):
        sections.append(("", "other variants" if parts else "ablations", others))
    for p, title, g in sections:
        # (a) compares teacher pairs among themselves (its first pair is its reference); the other
        # parts compare against the full method (the study's first row), shown atop each part
        base = g.iloc[0] if p == "a" else ref
        rows_ = ([] if p == "a" or (g["label"] == ref["label"]).any() else [ref]) + [r for _, r in g.iterrows()]
        body = [line(r, base) for r in rows_]
        md += [f"## {title}", "", markdown_table(header, body), ""]
        tex_rows += [[title] + [""] * (len(header) - 1)] + body
    paper_known = out[out["paper_top1"].map(lambda v: math.isfinite(v))]
    md += ["## (b) continuing with MEAL V2", "", PART_B_NOTE, "",
           "ours: top-1 % as mean ± std over seeds (n); Δ against the reference row (the full method: "
           "teacher switch, τ_t 0.7, CKM on; in (a), the first pair listed). Paper: "
           + ("; ".join(f"{r['label']} {r['paper_top1']:.2f} ({r['paper_source']})" for _, r in paper_known.iterrows())
              or "no row of this study is one the paper reports")
           + ". The other rows of the paper's Table 4 are not in docs/METHOD.md or the official code, so "
           "they are not printed ('-'). The official README reports EffDstl MobileNet V3-Small 0.75 at "
           "67.34 without saying which teacher pair produced it."]
    tex = latex_table(header, tex_rows, f"Ablations, study {study_dir.name}: top-1 (%), mean ± std over seeds. "
                      f"{PART_B_NOTE}", "tab:table4")
    return out, _write(_out(study_dir, out_dir), "table4", out, "\n".join(md), tex)


TABLES = {"1": table1, "3": table3, "4": table4}
