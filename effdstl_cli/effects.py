"""Paired effect sizes: each configuration minus its anchor, seed by seed, with a 95 % interval.

Runs of one seed share their initialisation and, within a group job, every batch, so the
difference of two runs *of the same seed* removes most of the seed noise that two independent
means carry. "A beats B" then is a statement with an interval: the mean of the per-seed
differences ± the t-interval half-width (``results.interval95``); ``verdict`` says whether the
interval excludes 0.

The anchor of a study is its natural reference (``ANCHOR``): the student distilled from the weak
teacher alone (Fig. 5/6: what every replacement or manipulation starts from), the student trained
without distillation (Table 1), EffDstl's reference row (Table 4). Any label can be the anchor
(``effdstl results STUDY --anchor WSL``). Comparisons stay within one *unit* (the same triplet,
teacher pair, setting and student; ``UNIT``), never across.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from .errors import EffdstlError
from .results import interval95

# study kind -> the label runs are compared to (meta.label, written by studies.py)
ANCHOR = {"replacement": "weak teacher only", "manipulation": "weak teacher only", "recipe": "no distill",
          "ablation": "EffDstl (switch, tau 0.7, CKM)", "fig8": "manipulate incorrect (reg)", "student": "none"}
# what must match for two runs to be compared, per study kind (Table 4's variants change the
# teachers, so there the student alone is the unit; Table 1 compares with a run that has none)
UNIT = ("study", "triplet", "pair", "setting", "student")
UNIT_BY_KIND = {"ablation": ("study", "student"),
                "recipe": ("study", "pair", "setting", "student")}  # no distillation has no teachers in its triplet
COLUMNS = (*UNIT, "label", "anchor", "metric", "n", "acc", "acc_anchor", "diff", "ci95", "ci_low", "ci_high",
           "verdict")


def default_anchor(df: pd.DataFrame) -> str:
    """The anchor label for the study kind of ``df`` (the first kind present)."""
    kinds = [k for k in dict.fromkeys(df["study_kind"]) if k in ANCHOR]
    if not kinds:
        raise EffdstlError(f"no default anchor for study kind(s) {', '.join(map(str, set(df['study_kind'])))}: "
                           f"name one with --anchor LABEL")
    return ANCHOR[kinds[0]]


def _unit_of(df: pd.DataFrame) -> list[str]:
    """The unit columns of this study kind that are set in ``df``."""
    kinds = [k for k in dict.fromkeys(df["study_kind"]) if k]
    cols = UNIT_BY_KIND.get(kinds[0] if kinds else "", UNIT)
    return [c for c in cols if c in df.columns and (df[c].fillna("").astype(str) != "").any()]


def verdict(low: float, high: float) -> str:
    if not (low == low and high == high):   # NaN: fewer than 2 pairs
        return "n < 2"
    return "higher" if low > 0 else "lower" if high < 0 else "no clear difference"


def paired_difference(mine: dict[int, float], ref: dict[int, float]) -> dict:
    """``mine - ref`` over the seeds both have: n, mean, 95 % half-width, interval and verdict."""
    seeds = sorted(set(mine) & set(ref))
    mean, _, n, half = interval95([mine[s] - ref[s] for s in seeds])
    lo, hi = mean - half, mean + half
    return {"n": n, "acc": sum(mine[s] for s in seeds) / n if n else float("nan"),
            "acc_anchor": sum(ref[s] for s in seeds) / n if n else float("nan"),
            "diff": mean, "ci95": half, "ci_low": lo, "ci_high": hi, "verdict": verdict(lo, hi)}


def paired_effects(df: pd.DataFrame, anchor: str | None = None, metric: str = "best_top1",
                   labels: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (unit, label): the per-seed differences ``metric(label) - metric(anchor)``
    over the seeds both finished, their mean, 95 % half-width and interval, and the verdict.

    ``df``: ``results.collect``'s table. Only finished student runs count; teachers never do.
    """
    if metric not in df.columns:
        raise EffdstlError(f"unknown metric '{metric}': best_top1, last_top1, best_top5, last_top5")
    st = df[(df["state"] == "done") & (df["role"] != "teacher") & (df["study_kind"] != "teacher")]
    anchor = anchor or default_anchor(df)
    if not (st["label"] == anchor).any():
        have = sorted(set(st["label"]))
        raise EffdstlError(f"anchor '{anchor}': no finished run has that label; labels: {', '.join(have)}")
    unit = _unit_of(st)
    rows = []
    anchors: dict[tuple, dict[int, float]] = {}
    for _, r in st[st["label"] == anchor].iterrows():
        anchors.setdefault(tuple(str(r[c]) for c in unit), {})[int(r["seed"])] = float(r[metric])
    for key, g in st[st["label"] != anchor].groupby([*unit, "label"], sort=False, dropna=False):
        *u, label = key
        if labels and label not in labels:
            continue
        ref = anchors.get(tuple(str(v) for v in u))
        if not ref:
            continue
        d = paired_difference({int(s): float(v) for s, v in zip(g["seed"], g[metric])}, ref)
        if d["n"]:
            rows.append({**dict(zip(unit, u)), "label": label, "anchor": anchor, "metric": metric, **d})
    out = pd.DataFrame(rows)
    if not out.empty:
        out = out.sort_values([*unit, "label"], kind="stable", ignore_index=True)
    for c in COLUMNS:
        if c not in out.columns:
            out[c] = pd.Series(dtype=object)
    return out[[*unit, *[c for c in COLUMNS if c not in UNIT]]]


def effect_text(row: dict | pd.Series, nd: int = 2) -> str:
    """``+1.23 [+0.45, +2.01] (n=5)``: the paired difference in points, with its 95 % interval."""
    if row["ci95"] != row["ci95"]:
        return f"{row['diff']:+.{nd}f} (n={int(row['n'])})"
    return f"{row['diff']:+.{nd}f} [{row['ci_low']:+.{nd}f}, {row['ci_high']:+.{nd}f}] (n={int(row['n'])})"
