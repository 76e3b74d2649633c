"""The paper's figures (Fig. 5-8 layouts) from a study directory; PNG + PDF written atomically.

Every ``figureN(study_dir, out_dir=None)`` returns a :class:`FigureResult`: a list of the written
paths [PNG, PDF] (default ``study_dir/figures/figureN.{png,pdf}``) that also carries the matplotlib
``figure`` and ``info`` (what was drawn: groups, legend labels, point counts) for callers and tests. Figures are built on ``matplotlib.figure.Figure`` with the Agg
canvas: no pyplot global state, nothing to close.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .effects import METRIC, metric_label  # noqa: E402
from .errors import EffdstlError  # noqa: E402
from .files import atomic_write, read_jsonl as read_metrics  # noqa: E402
from .results import collect, interval95, normalized  # noqa: E402
from .targets import MANIPULATIONS, SCHEMES, SUBSETS  # noqa: E402 - order, labels, symbols: the registries

NETWORK_ORDER = ("teacher", "student", "undistilled")
NETWORK_TITLE = {"teacher": "teacher", "student": "distilled student", "undistilled": "undistilled network"}
FIG8_LABEL = {"reg_cor": "CKM on reg ∩ correct (keep incorrect)", "reg": "CKM on all reg (manipulate incorrect)"}
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
            "#7f7f7f", "#bcbd22")


class FigureResult(list):
    """The written paths [png, pdf] (a list, so callers can just iterate it), plus ``figure`` (the
    matplotlib Figure) and ``info`` (what was drawn: groups, legend labels, point counts)."""

    def __init__(self, paths: list[Path], figure: Figure, info: dict[str, Any] | None = None):
        super().__init__(paths)
        self.figure = figure
        self.info = info or {}

    @property
    def paths(self) -> list[Path]:
        return list(self)

    def __repr__(self) -> str:
        return f"FigureResult({[str(p) for p in self]!r})"


# -- helpers -------------------------------------------------------------------------------

def label(registry: dict, name: str) -> str:
    """A scheme's, subset's or manipulation's label in figures (its registered ``label``, else its name)."""
    entry = registry.get(name)
    return entry.label if entry is not None else name


def _ordered(values: Sequence[str], order: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(v for v in values))
    return [v for v in order if v in present] + sorted(v for v in present if v not in order)


def _subset_colors(subsets: Sequence[str]) -> dict[str, str]:
    out = {}
    order = tuple(SUBSETS)
    for i, s in enumerate(_ordered(subsets, order)):
        k = order.index(s) if s in order else len(order) + i
        out[s] = _PALETTE[k % len(_PALETTE)]
    return out


def _new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), layout="constrained", dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, study_dir: Path, out_dir: str | Path | None, stem: str, info: dict) -> FigureResult:
    out = Path(out_dir) if out_dir is not None else Path(study_dir) / "figures"
    png = atomic_write(out / f"{stem}.png", lambda p: fig.savefig(p, format="png", dpi=150))
    pdf = atomic_write(out / f"{stem}.pdf", lambda p: fig.savefig(p, format="pdf"))
    return FigureResult([png, pdf], fig, info)


def _offsets(n: int, inner: float = 0.11, outer: float = 0.34) -> np.ndarray:
    """Deterministic jitter: n points (in seed order) spread over ``inner..outer`` on both sides of
    the group centre, leaving the centre free for the mean marker and its interval bar."""
    if n <= 0:
        return np.zeros(0)
    if n == 1:
        return np.array([-(inner + outer) / 2])
    k = n + (n % 2)  # an even count has no point at the centre
    base = np.linspace(-1.0, 1.0, k)
    if n % 2:
        base = np.delete(base, k // 2)
    a = np.abs(base)
    lo = a.min()
    frac = (a - lo) / (1.0 - lo) if 1.0 - lo > 1e-12 else np.zeros_like(a)
    return np.sign(base) * (inner + (outer - inner) * frac)


def _fmt_param(kind: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    m = MANIPULATIONS.get(kind)
    name = m.symbol if m else "param"
    return f"{name}={float(v):g}" if isinstance(v, (int, float, np.floating)) else f"{name}={v}"


def _teacher_lines(ax) -> None:
    for y, text in ((0.0, "weak teacher"), (1.0, "strong teacher")):
        ax.axhline(y, color="0.35", ls="--", lw=1.0, zorder=1)
        ax.annotate(text, xy=(1.0, y), xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", va="center", ha="left", fontsize=8, color="0.3",
                    annotation_clip=False)


# -- Fig. 5 / Fig. 6: normalized accuracy per scheme (manipulation) x subset ----------------------

def _strip_figure(norm: pd.DataFrame, outer_keys: list[tuple], outer_label: dict, xlabel: str,
                  suptitle: str) -> tuple[Figure, dict]:
    """One panel per triplet; x groups = outer keys, within each one column per subset."""
    subsets = _ordered(norm["subset"].tolist(), tuple(SUBSETS))
    colors = _subset_colors(subsets)
    triplets = list(dict.fromkeys(norm["triplet"]))
    S, G = len(subsets), len(outer_keys)
    ncols = min(len(triplets), 2)
    nrows = int(np.ceil(len(triplets) / ncols))
    w_panel = max(5.5, 0.38 * G * (S + 1) + 1.6)
    fig = _new_figure(w_panel * ncols + 0.6, 3.9 * nrows + 0.9)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    info: dict[str, Any] = {"panels": [], "legend": [], "groups": 0, "points": 0}
    ymin, ymax = 0.0, 1.0
    for ax, tr in zip(axes, triplets):
        d = norm[norm["triplet"] == tr]
        groups = 0
        for gi, key in enumerate(outer_keys):
            for si, sub in enumerate(subsets):
                g = d[(d["_outer"].map(lambda k: k == key)) & (d["subset"] == sub)].sort_values("seed")
                if g.empty:
                    continue
                groups += 1
                x0 = gi * (S + 1) + si
                ys = g["norm"].to_numpy(float)
                ax.scatter(x0 + _offsets(len(ys)), ys, s=16, color=colors[sub], alpha=0.75,
                           edgecolors="none", zorder=3)
                mean, _, n, half = interval95(ys)
                if n >= 2 and np.isfinite(half):
                    ax.errorbar([x0], [mean], yerr=[[half], [half]], fmt="none", ecolor="black",
                                elinewidth=1.2, capsize=3, zorder=4)
                    ymin, ymax = min(ymin, mean - half), max(ymax, mean + half)
                ax.plot([x0], [mean], marker="D", ms=5, mfc="white", mec="black", mew=1.2, zorder=5)
                ymin, ymax = min(ymin, ys.min()), max(ymax, ys.max())
                info["points"] += len(ys)
        info["groups"] += groups
        info["panels"].append({"triplet": tr, "groups": groups})
        for gi in range(1, G):
            ax.axvline(gi * (S + 1) - 1, color="0.85", lw=0.8, zorder=0)
        ax.set_xticks([gi * (S + 1) + (S - 1) / 2 for gi in range(G)])
        ax.set_xticklabels([outer_label[k] for k in outer_keys])
        ax.set_xlim(-0.8, G * (S + 1) - 1.2)
        ax.set_xlabel(xlabel)
        ax.tick_params(axis="x", length=0)
        ax.grid(axis="y", color="0.92", lw=0.8, zorder=0)
        ax.set_axisbelow(True)
        _teacher_lines(ax)
        weak, strong, student = (tr.split("|") + ["", "", ""])[:3]
        lo, hi = float(d["acc_minus"].iloc[0]), float(d["acc_plus"].iloc[0])
        ax.set_title(f"weak {weak} → strong {strong}, student {student}\n"
                     f"acc− {lo:.2f}% (n={int(d['n_minus'].iloc[0])}), "
                     f"acc+ {hi:.2f}% (n={int(d['n_plus'].iloc[0])})", fontsize=9)
    for ax in axes[len(triplets):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("normalized accuracy")
    pad = 0.08 * (ymax - ymin)
    axes[0].set_ylim(ymin - pad, ymax + pad)
    handles = [Line2D([], [], ls="none", marker="o", ms=5, color=colors[s]) for s in subsets]
    labels = [label(SUBSETS, s) for s in subsets]
    handles.append(Line2D([], [], ls="none", marker="D", ms=5, mfc="white", mec="black"))
    labels.append("mean ± 95% CI")
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=8,
               title="subset manipulated", title_fontsize=8, frameon=False)
    fig.suptitle(suptitle, fontsize=10)
    info["legend"] = labels
    info["subsets"] = subsets
    return fig, info


def _norm_for(study_dir: Path, distiller: str, what: str, metric: str) -> pd.DataFrame:
    df = collect(study_dir)
    keep = (df["baseline"].isin(["weak", "strong"])) | (df["distiller"] == distiller)
    if not ((df["distiller"] == distiller) & (df["state"] == "done") & (df["baseline"] == "")).any():
        n = int((df["distiller"] == distiller).sum())
        raise EffdstlError(f"no finished {what} runs in {study_dir} ({n} planned or unfinished): "
                           f"run the study first, or pick a {what} study")
    norm = normalized(df[keep], metric=metric)
    norm = norm[norm["distiller"] == distiller].copy()
    norm["seed"] = norm["seed"].astype(float)
    return norm


def _title(norm: pd.DataFrame, fig_name: str) -> str:
    studies = ", ".join(dict.fromkeys(norm["study"]))
    # a dataset given as a file (npz:PATH, imagenet:PATH) by its file name: where it lies is no result
    datasets = ", ".join(dict.fromkeys(d.split(":")[0] + ":" + Path(d.split(":", 1)[1]).name if ":" in d else d
                                       for d in map(str, norm["dataset"])))
    return f"{fig_name} — study {studies} ({datasets}); {len(set(norm['triplet']))} triplet(s)"


def figure5(study_dir: str | Path, out_dir: str | Path | None = None, metric: str = METRIC) -> FigureResult:
    """Fig. 5: normalized accuracy per replacement scheme x subset; one panel per triplet."""
    study_dir = Path(study_dir)
    norm = _norm_for(study_dir, "replace", "replacement", metric)
    schemes = _ordered(norm["scheme"].tolist(), tuple(SCHEMES))
    norm["_outer"] = [(s,) for s in norm["scheme"]]
    keys = [(s,) for s in schemes]
    fig, info = _strip_figure(norm, keys, {k: label(SCHEMES, k[0]) for k in keys}, "replacement scheme",
                              _title(norm, f"Fig. 5: replacing the weak teacher's targets ({metric_label(metric)})"))
    info["x_groups"] = schemes
    return _save(fig, study_dir, out_dir, "figure5", info)


def figure6(study_dir: str | Path, out_dir: str | Path | None = None, metric: str = METRIC) -> FigureResult:
    """Fig. 6: normalized accuracy per manipulation kind (and parameter) x subset."""
    study_dir = Path(study_dir)
    norm = _norm_for(study_dir, "manipulate", "manipulation", metric)
    pkey = norm["param"].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else v)
    norm["_outer"] = list(zip(norm["manipulation"], pkey))
    kinds = _ordered(norm["manipulation"].tolist(), tuple(MANIPULATIONS))
    keys: list[tuple] = []
    for k in kinds:
        ps = {p for (s, p) in norm["_outer"] if s == k}
        keys += [(k, p) for p in sorted(ps, key=lambda v: (v is None, str(v) if not isinstance(v, float) else v))]
    names = {key: f"{label(MANIPULATIONS, key[0])}\n{_fmt_param(*key)}".rstrip() for key in keys}
    fig, info = _strip_figure(norm, keys, names, "manipulation",
                              _title(norm, f"Fig. 6: manipulating the weak teacher's targets ({metric_label(metric)})"))
    info["x_groups"] = [names[k] for k in keys]
    return _save(fig, study_dir, out_dir, "figure6", info)


# -- Fig. 7: FGSM confidence-drop densities -------------------------------------------------

def kde(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gaussian kernel density of ``x`` on ``grid`` (Scott's bandwidth, numpy only)."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return np.zeros_like(grid)
    span = float(grid.max() - grid.min()) or 1.0
    sd = float(x.std(ddof=1)) if x.size > 1 else 0.0
    iqr = float(np.subtract(*np.percentile(x, [75, 25]))) / 1.349 if x.size > 1 else 0.0
    spread = min(sd, iqr) if min(sd, iqr) > 0 else max(sd, iqr)
    bw = max(1.06 * spread * x.size ** (-1 / 5), span / 400)
    dens = np.zeros_like(grid, dtype=float)
    for chunk in np.array_split(x, max(1, x.size // 2000)):
        z = (grid[:, None] - chunk[None, :]) / bw
        dens += np.exp(-0.5 * z * z).sum(axis=1)
    return dens / (x.size * bw * np.sqrt(2 * np.pi))


def _load_fgsm(study_dir: Path) -> pd.DataFrame:
    files = sorted((study_dir / "fgsm").glob("*/fgsm.parquet"))
    if not files:
        raise EffdstlError(f"no FGSM tables under {study_dir / 'fgsm'}: run `effdstl attack fgsm` on the "
                           f"study first")
    parts = []
    for f in files:
        try:
            parts.append(pd.read_parquet(f))
        except Exception as exc:  # a corrupt table: say which, never a traceback
            raise EffdstlError(f"cannot read {f} ({type(exc).__name__}); re-run `effdstl attack fgsm`")
    df = pd.concat(parts, ignore_index=True)
    need = {"network", "subset", "eps", "drop"}
    if need - set(df.columns):
        raise EffdstlError(f"FGSM tables under {study_dir / 'fgsm'} lack column(s) "
                           f"{', '.join(sorted(need - set(df.columns)))}; re-run `effdstl attack fgsm`")
    return df


def _panel_range(xs: list[np.ndarray]) -> tuple[float, float]:
    """An x range that keeps every curve of a panel readable: the 0.5-99.5 % quantiles of all
    its samples (a few extreme drops do not squash the peaks), padded."""
    allx = np.concatenate([x for x in xs if x.size]) if any(x.size for x in xs) else np.zeros(1)
    lo, hi = (float(v) for v in np.percentile(allx, [0.5, 99.5]))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.01, hi + 0.01
    pad = 0.08 * (hi - lo)
    return lo - pad, hi + pad


def figure7(study_dir: str | Path, out_dir: str | Path | None = None, eps: float | None = None,
            max_eps: int = 4) -> FigureResult:
    """Fig. 7: density of the true-class confidence drop ``p(x)[y] - p(x_adv)[y]`` under FGSM (from
    the teacher), kept vs manipulated samples; one column per network (teacher, distilled student,
    undistilled network), one row per eps (up to ``max_eps`` of those present, spread; or only
    ``eps``). Every panel has its own scales, and the peak of each subset is marked and labelled,
    with the gap between the two peaks in the panel's title (docs/METHOD.md 'Fig. 7')."""
    study_dir = Path(study_dir)
    df = _load_fgsm(study_dir)
    eps_all = np.array(sorted(df["eps"].dropna().unique()), float)
    if eps is None:
        pick = np.unique(np.round(np.linspace(0, len(eps_all) - 1, min(max_eps, len(eps_all)))).astype(int))
        chosen = [float(eps_all[i]) for i in pick]
    else:
        near = eps_all[np.argmin(np.abs(eps_all - float(eps)))]
        if not np.isclose(near, float(eps), rtol=1e-6, atol=1e-9):
            raise EffdstlError(f"no FGSM rows at eps={eps:g}; eps present: {', '.join(f'{e:g}' for e in eps_all)}")
        chosen = [float(near)]
    networks = _ordered(df["network"].astype(str).tolist(), NETWORK_ORDER)
    subsets = _ordered(df["subset"].astype(str).tolist(), ("kept", "manipulated"))
    colors = {"kept": "#1f77b4", "manipulated": "#d62728"}
    for i, s in enumerate(subsets):
        colors.setdefault(s, _PALETTE[(i + 2) % len(_PALETTE)])
    fig = _new_figure(4.2 * len(networks) + 0.4, 3.0 * len(chosen) + 1.0)
    axes = np.atleast_2d(fig.subplots(len(chosen), len(networks), squeeze=False))
    info: dict[str, Any] = {"eps": chosen if eps is None else chosen[0], "eps_rows": chosen, "networks": networks,
                            "peaks": {}, "n": {}, "pool": {}}
    for row, e in enumerate(chosen):
        d = df[np.isclose(df["eps"].astype(float), e)]
        for col, net in enumerate(networks):
            ax = axes[row, col]
            xs = {s: d[(d["network"] == net) & (d["subset"] == s)]["drop"].to_numpy(float) for s in subsets}
            lo, hi = _panel_range(list(xs.values()))
            grid = np.linspace(lo, hi, 600)
            peaks = {}
            for s in subsets:
                x = xs[s]
                if x.size == 0:
                    continue
                y = kde(x, grid)
                ax.fill_between(grid, y, color=colors[s], alpha=0.18, lw=0)
                ax.plot(grid, y, color=colors[s], lw=1.6)
                k = int(np.argmax(y))
                peaks[s] = float(grid[k])
                ax.axvline(peaks[s], color=colors[s], ls="--", lw=1.1)
                left = s == "kept"  # the two labels on either side of their lines: no overlap
                ax.annotate(f"{peaks[s]:.3g}", xy=(peaks[s], y[k]), xytext=(-3 if left else 3, -2),
                            textcoords="offset points", fontsize=7.5, color=colors[s],
                            ha="right" if left else "left", va="top")
                info["n"][(net, s)] = int(x.size)
                if "pool" in d.columns:
                    sel = d[(d["network"] == net) & (d["subset"] == s)]
                    if len(sel):   # each run drew from its own pool: the pools add up over runs
                        info["pool"][s] = int(sel.groupby("run")["pool"].first().sum() if "run" in sel
                                              else sel["pool"].iloc[0])
            info["peaks"][(net, e)] = peaks
            if row == 0 or len(chosen) == 1:
                info["peaks"][net] = peaks  # first eps row: the per-network summary
            title = f"{NETWORK_TITLE.get(net, net)}, eps = {e:.3g}"
            if "kept" in peaks and "manipulated" in peaks:
                title += f"\npeak gap (manipulated − kept) {peaks['manipulated'] - peaks['kept']:+.3g}"
            ax.set_title(title, fontsize=8.5)
            ax.set_xlim(lo, hi)
            ax.set_ylim(bottom=0)
            ax.grid(color="0.93", lw=0.8)
            ax.set_axisbelow(True)
            ax.tick_params(labelsize=7.5)
            if row == len(chosen) - 1:
                ax.set_xlabel("true-class confidence drop p(x)[y] - p(x_adv)[y]", fontsize=8.5)
            if col == 0:
                ax.set_ylabel("density")
    handles, labels = [], []
    for s in subsets:
        ns = sorted({v for (net, sub), v in info["n"].items() if sub == s})
        n = f"n={ns[0]} per network" if len(ns) == 1 else "n=" + "/".join(str(v) for v in ns)
        runs = int(d["run"].nunique()) if "run" in d else 1
        if runs > 1:
            n += f" over {runs} runs"
        if s in info["pool"]:
            n += f", drawn at random of {info['pool'][s]}"
        handles.append(Patch(facecolor=colors[s], alpha=0.45, edgecolor=colors[s]))
        labels.append(f"{s} samples ({n})")
    handles.append(Line2D([], [], color="0.3", ls="--"))
    labels.append("peak of each subset (value marked)")
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8, frameon=False)
    runs = df["run"].nunique() if "run" in df.columns else 1
    fig.suptitle(f"Fig. 7: FGSM (from the teacher) on training samples the distilled run kept vs manipulated — "
                 f"study {study_dir.name}, {runs} distilled run(s); each panel on its own scales", fontsize=10)
    info["legend"] = labels
    return _save(fig, study_dir, out_dir, "figure7", info)


# -- Fig. 8: train / validation accuracy, keep vs manipulate incorrect samples -------------

CURVE_PANELS = {"train_top1": "train accuracy (top-1, %)", "test_top1": "validation accuracy (top-1, %)",
                "train_loss": "train loss", "test_loss": "validation loss",
                "gap": "train − validation accuracy (points)"}


def _curve_frames(run_dirs: Sequence[str], keys: Sequence[str]) -> tuple[dict[str, list[pd.Series]], set]:
    """Per metric key, one Series (index: epoch) per run; and the epochs where a stage starts."""
    curves: dict[str, list[pd.Series]] = {k: [] for k in keys}
    switches: set = set()
    for rd in run_dirs:
        m = pd.DataFrame(read_metrics(Path(rd) / "metrics.jsonl"))
        if m.empty or "epoch" not in m:
            continue
        m = m.drop_duplicates("epoch", keep="last").set_index("epoch").sort_index()
        if "train_top1" in m and "test_top1" in m:
            m["gap"] = m["train_top1"].astype(float) - m["test_top1"].astype(float)
        for k in keys:
            if k in m:
                curves[k].append(m[k].astype(float))
        if "stage" in m:
            stg = m["stage"].astype(float)
            switches.update(stg.index[stg.diff().fillna(0) > 0].tolist())
    return curves, switches


def curves(study_dir: str | Path, labels: Sequence[str] | None = None, out_dir: str | Path | None = None,
           panels: Sequence[str] = ("train_top1", "test_top1", "train_loss", "test_loss"), by: str = "label",
           names: dict[str, str] | None = None, stem: str = "curves", title: str | None = None) -> FigureResult:
    """Training curves: one panel per metric of metrics.jsonl (``CURVE_PANELS``; ``gap`` = train
    minus validation accuracy), one line per ``by`` value (default: the run label; mean over
    seeds, ±1 std band), the epochs where a recipe's stage 2 starts dotted. Teachers are left out."""
    study_dir = Path(study_dir)
    bad = [p for p in panels if p not in CURVE_PANELS]
    if bad:
        from .errors import unknown

        raise unknown("curve panel", bad[0], CURVE_PANELS)
    df = collect(study_dir)
    st = df[(df["role"] == "student") & (df["epochs_done"].fillna(0) > 0)]
    present = list(dict.fromkeys(st[by]))
    if labels:
        missing = [lb for lb in labels if lb not in present]
        if missing:
            from .errors import unknown

            raise unknown(f"{'label' if by == 'label' else by} in study {study_dir.name}", missing[0], present)
        st = st[st[by].isin(labels)]
    if st.empty:
        raise EffdstlError(f"no student run with metrics in {study_dir}: launch the study first (or wait for "
                           f"its first epoch)")
    groups = list(labels) if labels else _ordered(st[by].tolist(), ())
    colors = {g: _PALETTE[i % len(_PALETTE)] for i, g in enumerate(groups)}
    ncol = min(len(panels), 2 if len(panels) == 4 else len(panels))
    nrow = -(-len(panels) // ncol)
    fig = _new_figure(5.0 * ncol, 3.6 * nrow + 0.4 + 0.18 * len(groups))
    axes = np.atleast_1d(fig.subplots(nrow, ncol, sharex=True, squeeze=False)).ravel()
    info: dict[str, Any] = {"groups": groups, "runs": {}, "legend": [], "panels": list(panels)}
    switch_epochs: set = set()
    for g in groups:
        cs, sw = _curve_frames(st[st[by] == g]["run_dir"].tolist(), panels)
        switch_epochs |= sw
        info["runs"][g] = len(cs[panels[0]])
        for ax, k in zip(axes, panels):
            if not cs[k]:
                continue
            M = pd.concat(cs[k], axis=1).sort_index()
            mean, std = M.mean(axis=1), M.std(axis=1, ddof=1).fillna(0.0)
            ax.plot(M.index, mean, color=colors[g], lw=1.6)
            ax.fill_between(M.index, mean - std, mean + std, color=colors[g], alpha=0.2, lw=0)
    for ax, k in zip(axes, panels):
        for e in sorted(switch_epochs):
            ax.axvline(e - 0.5, color="0.5", ls=":", lw=1)
        name = CURVE_PANELS[k].split(" (")[0]
        ax.set_title(name + (" (dotted: stage-2 start)" if switch_epochs else ""), fontsize=9)
        if ax in axes[-ncol:] or len(panels) <= ncol:
            ax.set_xlabel("epoch")
        ax.set_ylabel(CURVE_PANELS[k])
        ax.grid(color="0.93", lw=0.8)
        ax.set_axisbelow(True)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Patch(facecolor=colors[g], alpha=0.5, edgecolor=colors[g]) for g in groups]
    legend = [f"{(names or {}).get(g, g)}, n={info['runs'][g]} seed(s)" for g in groups]
    fig.legend(handles, legend, loc="outside lower center", ncols=min(len(legend), 3), fontsize=8.5,
               frameon=False, title="mean over seeds ± 1 std", title_fontsize=8)
    fig.suptitle(title or f"training curves — study {study_dir.name} ({', '.join(dict.fromkeys(st['dataset']))})",
                 fontsize=10)
    info["legend"] = legend
    return _save(fig, study_dir, out_dir, stem, info)


def figure8(study_dir: str | Path, out_dir: str | Path | None = None) -> FigureResult:
    """Fig. 8: the training curves of CKM on reg ∩ correct (keep incorrect samples) vs on all reg
    samples: train and validation accuracy and their gap, mean over seeds ± 1 std (``curves``)."""
    study_dir = Path(study_dir)
    df = collect(study_dir)
    st = df[(df["role"] == "student") & (df["baseline"] == "") & (df["subset"] != "")
            & (df["epochs_done"].fillna(0) > 0)]
    if "fig8" in set(df["study_kind"]):
        st = st[st["study_kind"] == "fig8"]
    if not st["subset"].isin(["reg_cor", "reg"]).any():
        raise EffdstlError(f"no student runs with metrics on subsets reg_cor / reg in {study_dir}: run a "
                           f"fig8 study first (or wait for its first epochs)")
    groups = _ordered(st[st["subset"].isin(["reg_cor", "reg"])]["subset"].tolist(), ("reg_cor", "reg"))
    return curves(study_dir, groups, out_dir, panels=("train_top1", "test_top1", "gap"), by="subset",
                  names=FIG8_LABEL, stem="figure8",
                  title=f"Fig. 8: keeping incorrect samples — study {study_dir.name} "
                        f"({', '.join(dict.fromkeys(st['dataset']))})")


FIGURES = {"5": figure5, "6": figure6, "7": figure7, "8": figure8}


# -- forest plots: every comparison of a study with its interval ---------------------------------

def forest(rows: Sequence[dict], out_dir: str | Path, stem: str, title: str, unit: str,
           margin: float | None = None) -> FigureResult:
    """One line per comparison: its seed-paired mean difference and 95 % interval (``diff``,
    ``ci_low``, ``ci_high``, ``label``, ``verdict``), a line at 0, and, on the rows judged by
    equivalence (a row's own ``margin``), the margin ±margin shaded (effects.RULES). ``margin``:
    the study's margin, recorded in ``info``. A comparison without an interval is its mean alone."""
    if not rows:
        raise EffdstlError(f"no comparisons to draw for {stem}")
    fig = _new_figure(8.5, 0.9 + 0.38 * len(rows))
    ax = fig.add_subplot()
    ys = np.arange(len(rows))[::-1]
    for y, r in zip(ys, rows):
        m = r.get("margin")   # only comparisons judged by equivalence carry (and show) a margin
        if m:
            ax.fill_between([-m, m], y - 0.4, y + 0.4, color="#2ca02c", alpha=0.15, lw=0, zorder=0)
        d, lo, hi = float(r["diff"]), float(r["ci_low"]), float(r["ci_high"])
        v = str(r.get("verdict", ""))
        color = "0.45" if v.startswith("not measurable") or "no clear" in v or "undecided" in v else "#1f77b4"
        if lo == lo and hi == hi:
            ax.plot([lo, hi], [y, y], color=color, lw=2.2, solid_capstyle="butt", zorder=2)
        ax.plot([d], [y], "o", color=color, ms=5, zorder=3)
    ax.axvline(0.0, color="0.3", lw=0.9, zorder=1)
    ax.set_yticks(ys, [f"{r['label']}  [{r.get('verdict', '')}]" for r in rows], fontsize=8)
    shaded = sorted({float(r["margin"]) for r in rows if r.get("margin")})
    ax.set_xlabel(unit + (f"; shaded: ≈ margin ±{', ±'.join(f'{x:g}' for x in shaded)}" if shaded else ""), fontsize=8)
    fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    ax.grid(axis="x", color="0.9", lw=0.6)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    info = {"labels": [r["label"] for r in rows], "margin": margin}
    return _save(fig, Path(out_dir), out_dir, stem, info)
