"""Results: one table row per run directory, normalized accuracy, grouped summaries.

Everything here is derived from run directories (docs/RUNDIR.md), so it can always be rebuilt:
``collect`` reads ``<study>/runs/*/{config.yaml,final.json,failed.json,metrics.jsonl,lock}``.
No torch import: reading results must stay fast and work without a GPU stack.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .errors import EffdstlError
from .files import atomic_write
from .rundir import RunDir, is_run_hash

META_KEYS = ("study", "study_kind", "dataset", "student", "weak", "strong", "triplet", "distiller",
             "scheme", "manipulation", "subset", "param", "baseline", "label", "seed", "pair", "setting", "part", "group")
FINAL_KEYS = ("best_top1", "last_top1", "best_top5", "last_top5", "best_epoch", "epochs", "wall_s",
              "gpu_hours", "device", "gpu_name", "world_size")
COLUMNS = ("run", "state", "role", *META_KEYS, *FINAL_KEYS, "epochs_done", "fail_reason", "run_dir")


# -- reading run directories ---------------------------------------------------------------

def _run_row(rd: Path) -> dict[str, Any]:
    run = RunDir(rd)
    cfg = run.config   # unreadable: one line naming the file and the cure
    meta = cfg.get("meta") or {}
    row: dict[str, Any] = {k: None for k in COLUMNS}
    row.update(run=rd.name, role=cfg.get("role", ""), run_dir=str(rd))
    for k in META_KEYS:
        row[k] = meta.get(k)
    if "manipulation" not in meta and meta.get("distiller") == "manipulate":
        row["manipulation"], row["scheme"] = meta.get("scheme"), ""  # runs planned before the column
    for k in ("study", "study_kind", "dataset", "student", "weak", "strong", "triplet", "distiller",
              "scheme", "manipulation", "subset", "baseline", "label", "pair", "setting", "part", "group"):
        row[k] = "" if row[k] is None else str(row[k])
    if row["seed"] is None:
        row["seed"] = cfg.get("seed")
    row["epochs_done"] = run.epochs_done()
    row["epochs"] = cfg.get("epochs")
    row["state"] = run.state()   # the same verdict as `effdstl status` and the launcher
    if row["state"] == "done":
        fin = run.final
        for k in FINAL_KEYS:
            if k in fin:
                row[k] = fin[k]
    elif row["state"] == "damaged":
        row["fail_reason"] = run.problem()   # never its numbers: a damaged run is not a result
    elif row["state"] == "failed":
        row["fail_reason"] = str((run.failed or {}).get("reason", "failed.json is unreadable"))
    return row


def _planned(study_dir: Path, study: dict | None) -> dict[str, dict] | None:
    """``{run hash: meta}`` of the study as it is now (``study``, else the study folder's
    study.yaml, which every launch rewrites), or None where neither plans (no study.yaml, or one
    that no longer plans: then every run folder counts, as before)."""
    import yaml

    from .studies import plan

    try:
        if study is None:
            f = study_dir / "study.yaml"
            if not f.is_file():
                return None
            study = yaml.safe_load(f.read_text())
        p = plan(study, study_dir.parent)
    except (EffdstlError, OSError, KeyError, TypeError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return {d.name: (cfg.get("meta") or {}) for j in p.jobs for cfg, d in j.runs}


def collect(study_dir: str | Path, study: dict | None = None, stale: bool = False) -> pd.DataFrame:
    """One row per run directory ``study_dir/runs/*/`` holding a config.yaml, of the study as it
    is now: a run folder that the study (``study``, else its folder's study.yaml) no longer plans —
    left from an earlier version of the study file — is left out unless ``stale``, and a finished
    run the study reuses under a new label (its config unchanged, so its hash) takes the study's
    labels (meta is not part of a run's identity). ``df.attrs['stale']``: how many were left out.

    Columns: run (the hash), state (done | damaged | failed | running | partial | pending: the
    one verdict of ``rundir.RunDir.state``), role, every
    ``meta`` key, final.json's numbers (NaN until done; ``epochs`` falls back to the planned
    epochs), epochs_done (valid metrics.jsonl lines), fail_reason (a damaged run: what is wrong), run_dir.
    ``running`` = a live lock; ``partial`` = epochs written but nobody training it now.
    """
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise EffdstlError(f"study directory {study_dir} does not exist (launch the study first, or check "
                           f"the results root)")
    runs = sorted(p for p in (study_dir / "runs").glob("*/") if (p / "config.yaml").is_file())
    if not runs:
        raise EffdstlError(f"no runs under {study_dir / 'runs'} (no */config.yaml): launch the study first")
    planned = None if stale else _planned(study_dir, study)
    # A folder named like a run hash is the study's when the study plans it; one named otherwise (made
    # by hand or by other code) has no identity to compare, so it always counts.
    rows = [_run_row(rd) for rd in runs if planned is None or rd.name in planned or not is_run_hash(rd.name)]
    if planned is not None:
        for r in rows:   # the study's labels as it is now (a run's config.yaml keeps those it was made with)
            for k, v in planned.get(r["run"], {}).items():
                if k in META_KEYS and k != "seed":
                    r[k] = "" if v is None and k != "param" else (v if k == "param" else str(v))
    if not rows:
        raise EffdstlError(f"none of the {len(runs)} runs under {study_dir / 'runs'} belongs to the study as it "
                           f"is now: launch the study first")
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.attrs["stale"] = len(runs) - len(rows)
    for k in ("best_top1", "last_top1", "best_top5", "last_top5", "wall_s", "gpu_hours"):
        df[k] = pd.to_numeric(df[k], errors="coerce").astype(float)
    for k in ("best_epoch", "epochs", "world_size", "seed", "epochs_done"):
        df[k] = pd.to_numeric(df[k], errors="coerce").astype("Int64")
    num = pd.to_numeric(df["param"], errors="coerce")
    if num.notna().sum() == df["param"].notna().sum():  # all numeric (or missing): store as float
        df["param"] = num.astype(float)
    else:
        df["param"] = df["param"].map(lambda v: None if v is None else str(v)).astype(object)
    for k in ("device", "gpu_name", "fail_reason"):
        df[k] = df[k].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return df


def write_table(df: pd.DataFrame, out_dir: str | Path, stem: str = "results") -> list[Path]:
    """Write ``<out_dir>/<stem>.csv`` and ``.parquet`` atomically; returns [csv, parquet]."""
    out_dir = Path(out_dir)
    csv = atomic_write(out_dir / f"{stem}.csv", lambda p: df.to_csv(p, index=False))
    pq = atomic_write(out_dir / f"{stem}.parquet", lambda p: df.to_parquet(p, index=False))
    return [csv, pq]


# -- normalized accuracy (docs/METHOD.md 'Normalized accuracy') ---------------------------------

def _is_done(df: pd.DataFrame) -> pd.Series:
    return df["state"] == "done"


def normalized(df: pd.DataFrame, metric: str = "last_top1") -> pd.DataFrame:
    """Altered runs with ``norm = (acc - acc-) / (acc+ - acc-)`` (docs/METHOD.md, Fig. 5/6).

    ``metric``: the final epoch's accuracy by default (``best_*`` picks its epoch on the test set).
    Per (study, triplet): acc- / acc+ are the MEAN over seeds of the finished baseline runs
    (meta.baseline 'weak' / 'strong'). Altered runs are finished student runs with baseline ''.
    Adds acc_minus, acc_plus, n_minus, n_plus, acc (= ``metric``) and norm.
    """
    if metric not in df.columns:
        raise EffdstlError(f"unknown metric '{metric}' for normalization; choices: best_top1, last_top1, "
                           f"best_top5, last_top5")
    done = df[_is_done(df) & (df["role"] == "student")]
    altered = done[done["baseline"].fillna("") == ""].copy()
    extra = ["acc", "acc_minus", "acc_plus", "n_minus", "n_plus", "norm"]
    if altered.empty:
        return altered.assign(**{c: pd.Series(dtype=float) for c in extra})
    parts = []
    for (study, triplet), g in altered.groupby(["study", "triplet"], sort=False, dropna=False):
        anchors = {}
        for which, word in (("weak", "weak"), ("strong", "strong")):
            b = done[(done["study"] == study) & (done["triplet"] == triplet) & (done["baseline"] == which)]
            vals = b[metric].dropna()
            if vals.empty:
                have = df[(df["study"] == study) & (df["triplet"] == triplet) & (df["baseline"] == which)]
                why = (f"{len(have)} exist but none finished with {metric}" if len(have)
                       else "none in the results")
                raise EffdstlError(f"no {word}-teacher baseline run for triplet {triplet} in study {study}: "
                                   f"run the study's baselines first ({why}; re-run the study to train them)")
            anchors[which] = (float(vals.mean()), int(len(vals)))
        (lo, n_lo), (hi, n_hi) = anchors["weak"], anchors["strong"]
        if abs(hi - lo) < 1e-9:
            raise EffdstlError(f"cannot normalize triplet {triplet} in study {study}: the weak- and "
                               f"strong-teacher baselines have the same {metric} ({lo:.4g}); pick teachers "
                               f"of different accuracy")
        g = g.copy()
        g["acc"] = g[metric].astype(float)
        g["acc_minus"], g["acc_plus"], g["n_minus"], g["n_plus"] = lo, hi, n_lo, n_hi
        g["norm"] = (g["acc"] - lo) / (hi - lo)
        parts.append(g)
    return pd.concat(parts, ignore_index=True)


# -- summaries with a 95% interval ----------------------------------------------------------

# Two-sided 95% Student-t quantiles t_{0.975, df}; beyond 30 degrees of freedom, interpolated
# in 1/df towards the normal 1.96 (avoids a scipy dependency; matches scipy to 3 decimals).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom (NaN for dof < 1)."""
    if dof < 1:
        return float("nan")
    if dof in _T975:
        return _T975[dof]
    keys = sorted(_T975)
    if dof > keys[-1]:
        lo_k, lo_v, hi_inv, hi_v = keys[-1], _T975[keys[-1]], 0.0, 1.960
    else:
        lo_k = max(k for k in keys if k < dof)
        hi_k = min(k for k in keys if k > dof)
        lo_v, hi_inv, hi_v = _T975[lo_k], 1.0 / hi_k, _T975[hi_k]
    w = (1.0 / dof - hi_inv) / (1.0 / lo_k - hi_inv)
    return hi_v + w * (lo_v - hi_v)


def interval95(values: Iterable[float]) -> tuple[float, float, int, float]:
    """(mean, std, n, half-width of the 95% t-interval of the mean); std/half NaN for n < 2."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = int(v.size)
    if n == 0:
        return float("nan"), float("nan"), 0, float("nan")
    mean = float(v.mean())
    if n < 2:
        return mean, float("nan"), 1, float("nan")
    std = float(v.std(ddof=1))
    return mean, std, n, t975(n - 1) * std / math.sqrt(n)


def summarize(df: pd.DataFrame, by: str | Sequence[str], value: str = "norm") -> pd.DataFrame:
    """Per group of ``by``: mean, std (ddof 1), n, ci95 (half-width), ci_low, ci_high of ``value``."""
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*by, value] if c not in df.columns]
    if missing:
        raise EffdstlError(f"cannot summarize: no column(s) {', '.join(missing)}; "
                           f"columns: {', '.join(map(str, df.columns))}")
    rows = []
    for key, g in df.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        mean, std, n, half = interval95(g[value].astype(float))
        rows.append({**dict(zip(by, key)), "mean": mean, "std": std, "n": n, "ci95": half,
                     "ci_low": mean - half, "ci_high": mean + half})
    return pd.DataFrame(rows, columns=[*by, "mean", "std", "n", "ci95", "ci_low", "ci_high"])
