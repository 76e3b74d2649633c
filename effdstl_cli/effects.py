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

# study kind -> the label runs are compared to (meta.label, written by studies.py). Table 4's rows
# (the paper's, docs/METHOD.md 'Table 4') have one full-method row per student: a tuple lists the
# candidates, and each unit (student) takes the first one it has.
ANCHOR = {"replacement": "weak teacher only", "manipulation": "weak teacher only", "recipe": "no distill",
          "ablation": ("(a) ResNet34 -> ResNet34d", "(c) switch, ResNet18", "(c) switch, MobileNet V1",
                       "(e) CKM on, ResNet34d", "EffDstl (switch, tau 0.7, CKM)"),
          "fig8": "manipulate incorrect (reg)", "student": "none"}
# The number every comparison uses: the final epoch's accuracy. ``best_top1`` (the maximum over
# epochs) picks its epoch on the test set, and in the two-stage recipe can pick a stage-1 epoch.
METRIC = "last_top1"
METRICS = ("last_top1", "last_top5", "best_top1", "best_top5")
TEST_CHOSEN = "chosen on the test set"   # how ``best_*`` is labelled wherever it is shown


def metric_label(metric: str) -> str:
    """``last_top1`` -> 'last-epoch top-1'; ``best_*`` says that its epoch was chosen on the test set."""
    k = metric.split("_")[-1].replace("top", "top-")
    return f"last-epoch {k}" if metric.startswith("last") else f"best-epoch {k} ({TEST_CHOSEN})"
# what must match for two runs to be compared, per study kind (Table 4's variants change the
# teachers, so there the student alone is the unit; Table 1 compares with a run that has none)
UNIT = ("study", "triplet", "pair", "setting", "student")
UNIT_BY_KIND = {"ablation": ("study", "student"),
                "recipe": ("study", "pair", "setting", "student")}  # no distillation has no teachers in its triplet
COLUMNS = (*UNIT, "label", "anchor", "metric", "n", "acc", "acc_anchor", "diff", "ci95", "ci_low", "ci_high",
           "verdict")


def default_anchor(df: pd.DataFrame) -> str | tuple[str, ...]:
    """The anchor label (or candidate labels, first present per unit) for the study kind of ``df``."""
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


# -- the verdict rules (stated once, in RULES; the report prints them) ----------------------------

MIN_SEEDS = 3          # fewer paired seeds than this: not measurable here
MARGIN_NORM = 0.10     # "A ≈ B" on normalized accuracy: within ±0.10 (a tenth of the gap acc+ − acc-)
MARGIN_POINTS = 0.5    # "A ≈ B" on accuracy (Table 4 (d): tau 0.8 against 0.7): within ±0.5 points
RULES = (
    f"Every comparison is a seed-paired difference A − B (the same seed shares initialisation and "
    f"batches) with its 95 % t-interval over seeds. **A > B** when the interval lies above 0, **A < B** "
    f"when below; otherwise **no clear difference**. **A ≈ B** when both ends of the interval lie inside "
    f"the equivalence margin ±{MARGIN_NORM:.2f} in normalized accuracy (a tenth of the distance between "
    f"the students of the weak and the strong teacher), or ±{MARGIN_POINTS:g} points of accuracy where a claim is "
    f"in accuracy (Table 4 (d)); an interval that reaches past the margin but "
    f"contains 0 is **undecided**, one that excludes 0 and leaves the margin is **different**. **Best "
    f"subset**: the subset with the highest mean, only if it beats the runner-up by an interval; "
    f"otherwise a **tie** of the two is named. **Fig. 7**: the sign and size of the manipulated − kept "
    f"gap, at every eps, for each network, each with its interval. **Not measurable here**: fewer than "
    f"{MIN_SEEDS} paired seeds, a zero-width interval (the runs do not differ at all), or teachers whose "
    f"students do not beat the student of the weak teacher alone (acc+ − acc- not above 0 by an interval).")


def not_measurable(low: float, high: float, n: int) -> str | None:
    """Why an interval cannot carry a verdict (fewer than MIN_SEEDS pairs, zero width), else None."""
    if n < MIN_SEEDS:
        return f"not measurable here (n={n} < {MIN_SEEDS} seeds)"
    if not (low == low and high == high):
        return "not measurable here (no interval)"
    if high - low <= 1e-12:
        return "not measurable here (zero-width interval: the runs do not differ)"
    return None


def greater(low: float, high: float, n: int) -> str:
    """'A > B' | 'A < B' | 'no clear difference' | 'not measurable here (...)' for an interval of A − B."""
    why = not_measurable(low, high, n)
    if why:
        return why
    return "A > B" if low > 0 else "A < B" if high < 0 else "no clear difference"


def equivalent(low: float, high: float, n: int, margin: float = MARGIN_NORM) -> str:
    """'A ≈ B' (both ends inside ±margin) | 'different' (excludes 0, leaves the margin) | 'undecided'."""
    why = not_measurable(low, high, n)
    if why:
        return why
    if -margin <= low and high <= margin:
        return "A ≈ B"
    if low > 0 or high < 0:
        return "different"
    return "undecided"


def best_of(means: dict[str, float], runner_up_diff: tuple[float, float, int] | None) -> tuple[str, str]:
    """The best of several candidates: (verdict, name). ``runner_up_diff``: the interval (low, high,
    n) of best − runner-up (the two highest means). The best only when that interval lies above 0;
    else a tie of the two, or not measurable."""
    order = sorted(means, key=lambda k: means[k], reverse=True)
    if len(order) < 2 or runner_up_diff is None:
        return "not measurable here (fewer than two candidates)", order[0] if order else ""
    lo, hi, n = runner_up_diff
    why = not_measurable(lo, hi, n)
    if why:
        return why, order[0]
    if lo > 0:
        return "best", order[0]
    return "tie", f"{order[0]} and {order[1]}"


def paired_difference(mine: dict[int, float], ref: dict[int, float]) -> dict:
    """``mine - ref`` over the seeds both have: n, mean, 95 % half-width, interval and verdict."""
    seeds = sorted(set(mine) & set(ref))
    mean, _, n, half = interval95([mine[s] - ref[s] for s in seeds])
    lo, hi = mean - half, mean + half
    return {"n": n, "acc": sum(mine[s] for s in seeds) / n if n else float("nan"),
            "acc_anchor": sum(ref[s] for s in seeds) / n if n else float("nan"),
            "diff": mean, "ci95": half, "ci_low": lo, "ci_high": hi,
            "verdict": not_measurable(lo, hi, n) or verdict(lo, hi)}


def paired_effects(df: pd.DataFrame, anchor: str | Sequence[str] | None = None, metric: str = METRIC,
                   labels: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (unit, label): the per-seed differences ``metric(label) - metric(anchor)``
    over the seeds both finished, their mean, 95 % half-width and interval, and the verdict.

    ``df``: ``results.collect``'s table. Only finished student runs count; teachers never do.
    """
    if metric not in METRICS or metric not in df.columns:
        raise EffdstlError(f"unknown metric '{metric}': {', '.join(METRICS)}")
    st = df[(df["state"] == "done") & (df["role"] != "teacher") & (df["study_kind"] != "teacher")]
    anchor = anchor or default_anchor(df)
    cands = [anchor] if isinstance(anchor, str) else list(anchor)
    if not st["label"].isin(cands).any():
        have = sorted(set(st["label"]))
        raise EffdstlError(f"anchor '{' or '.join(cands)}': no finished run has that label; labels: {', '.join(have)}")
    unit = _unit_of(st)
    rows = []
    anchors: dict[tuple, tuple[str, dict[int, float]]] = {}
    for cand in cands:   # per unit, the first candidate it has
        for key, g in st[st["label"] == cand].groupby(unit, sort=False, dropna=False) if unit else [((), st[st["label"] == cand])]:
            key = tuple(str(v) for v in (key if isinstance(key, tuple) else (key,)))
            anchors.setdefault(key, (cand, {int(s): float(v) for s, v in zip(g["seed"], g[metric])}))
    for key, g in st.groupby([*unit, "label"], sort=False, dropna=False):
        *u, label = key
        if labels and label not in labels:
            continue
        name, ref = anchors.get(tuple(str(v) for v in u), ("", {}))
        if not ref or label == name:
            continue
        d = paired_difference({int(s): float(v) for s, v in zip(g["seed"], g[metric])}, ref)
        if d["n"]:
            rows.append({**dict(zip(unit, u)), "label": label, "anchor": name, "metric": metric, **d})
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
