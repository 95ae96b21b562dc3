"""The figures of the report that results draw themselves in a notebook (``ScoreTable.heatmap()``,
a curve's ``.plot()``) and the report embeds: one copy of each, each returning a matplotlib Figure.
The report (:mod:`weightpatch.report`) adds the other, run-specific figures."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from weightpatch.results import ScoreTable

SCORE_UNIT = "fraction of anchor gap recovered"


def integer_axis(axis) -> None:
    axis.set_major_locator(MaxNLocator(integer=True))


def legend_outside(ax, **kwargs) -> None:
    """A legend under the axes, never over the curves."""
    handles = ax.get_legend_handles_labels()[0]
    if handles:
        ncol = min(len(handles), 3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False, fontsize=10, **kwargs)


def layer_profile(scores: ScoreTable | pd.DataFrame, method: str, kind: str = "neuron") -> Figure:
    """One method's scores of one kind per layer, a matplotlib Figure of two panels: their
    distribution per layer (box plot) and the sum of ``|score|`` per layer (the report's neuron
    figure, for any kind)."""
    frame = scores.frame if isinstance(scores, ScoreTable) else scores
    sub = frame[(frame["method"] == method) & (frame["kind"] == kind) & frame["layer"].notna()]
    if sub.empty:
        raise ValueError(f"no {method} scores of kind {kind!r} with a layer in this table")
    layers = sorted(int(v) for v in sub["layer"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].boxplot([sub[sub["layer"] == layer]["score"].to_numpy() for layer in layers], showfliers=True)
    axes[0].set_xticks(range(1, len(layers) + 1), [str(layer) for layer in layers])
    axes[0].set(xlabel="layer", ylabel=SCORE_UNIT, title=f"{kind} scores per layer ({method})")
    agg = sub.groupby("layer")["score"]
    axes[1].bar([str(layer) for layer in layers], agg.apply(lambda s: s.abs().sum()).to_numpy(), color="tab:purple")
    axes[1].set(xlabel="layer", ylabel=f"sum of |score| ({SCORE_UNIT})", title=f"total {kind} effect per layer")
    return fig


def head_matrix(heads: pd.DataFrame, method: str, column: str = "score") -> pd.DataFrame:
    sub = heads[heads["method"] == method]
    return sub.pivot_table(index="layer", columns="index", values=column, aggfunc="first", dropna=False)


def heatmap_axes(ax, matrix: pd.DataFrame, errors: pd.DataFrame | None, title: str, vmax: float, layers, heads) -> None:
    matrix = matrix.reindex(index=layers, columns=heads)
    values = matrix.to_numpy(dtype=float)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#e6e6e6")  # grey: not scored by this method
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set(xlabel="head", ylabel="layer", title=title)
    ax.set_xticks(range(len(heads)), [str(h) for h in heads])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    if values.size <= 64:
        err = errors.reindex(index=layers, columns=heads).to_numpy(dtype=float) if errors is not None else None
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                e = f"\n±{err[i, j]:.3f}" if err is not None and np.isfinite(err[i, j]) else ""
                color = "white" if abs(v) > 0.6 * vmax else "black"
                ax.text(j, i, f"{v:.3f}{e}", ha="center", va="center", fontsize=7, color=color)
    plt.colorbar(im, ax=ax, label=SCORE_UNIT, shrink=0.85)


HEAD_PANELS = {
    "first_order": "weight space, first order",
    "integrated_gradients": "weight space, integrated gradients",
    "exact": "weight space, exact",
    "activation": "activation space",
}


def head_heatmap(scores: ScoreTable | pd.DataFrame, method: str, vmax: float | None = None) -> Figure:
    """The layer x head map of one method's head scores (± stderr in each cell when small enough), a
    matplotlib Figure: one row per layer of the table (grey where a layer or head was not scored),
    colours symmetric around 0 up to ``vmax`` (default: the largest ``|score|`` of the heads)."""
    table = scores if isinstance(scores, ScoreTable) else ScoreTable(scores)
    heads = table.frame[table.frame["kind"] == "head"]
    matrix = table.matrix(method, "head")
    errors = head_matrix(heads, method, "stderr").reindex_like(matrix)
    layers, index = list(matrix.index), list(matrix.columns)
    vmax = vmax if vmax is not None else float(heads["score"].abs().max()) or 1.0
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(index) + 1.5, 1.2 + 0.7 * len(layers)))
    label = HEAD_PANELS.get(method, method)
    heatmap_axes(ax, matrix, errors if errors.notna().any().any() else None, label, vmax, layers, index)
    return fig


def curve_figure(frame: pd.DataFrame, name: str = "sufficiency") -> Figure:
    """A sufficiency (``name="sufficiency"``, column ``recovery``) or necessity (``drop``) curve as a
    matplotlib Figure: top-k per ranking against its random-k controls (mean ± sd)."""
    column = "recovery" if name == "sufficiency" else "drop"
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = frame.groupby("ranking", sort=False) if "ranking" in frame.columns else [("", frame)]
    for ranking, sub in groups:
        sub = sub.sort_values("k")
        prefix = f"{ranking}: " if ranking else ""
        line = ax.plot(sub["k"], sub[column], marker="o", label=f"{prefix}top-k")[0]
        controlled = sub[sub["n_controls"] > 0] if "n_controls" in sub else sub.iloc[0:0]
        if len(controlled):
            std = controlled["random_std"].fillna(0)
            ax.errorbar(
                controlled["k"],
                controlled["random_mean"],
                yerr=std,
                ls="--",
                marker="x",
                capsize=3,
                color=line.get_color(),
                alpha=0.8,
                label=f"{prefix}random k (mean ± sd)",
            )
    if frame["k"].max() > 16:
        ax.set_xscale("log", base=2)
        ks = sorted(int(k) for k in frame["k"].unique())
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
    else:
        integer_axis(ax.xaxis)
    ylabel = SCORE_UNIT if name == "sufficiency" else "fraction of anchor gap removed"
    title = (
        "sufficiency: top-k patched into base"
        if name == "sufficiency"
        else "necessity: top-k knocked out of specialized"
    )
    ax.set(xlabel="k (components)", ylabel=ylabel, title=title)
    legend_outside(ax)
    return fig
