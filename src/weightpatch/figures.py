"""The report's figures: matplotlib functions over run tables, each returning a Figure, and
:func:`figure`, which embeds one in the page (a base64 PNG data URI with its alt text and caption).

Presentation only: the numbers come from the tables and :mod:`weightpatch.analysis`; the HTML is
:mod:`weightpatch.report`'s. :func:`head_heatmap` is also ``ScoreTable.heatmap()``.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from weightpatch.analysis import fmt
from weightpatch.results import ScoreTable

SCORE_UNIT = "fraction of anchor gap recovered"


def figure(fig, alt: str, caption: str = "") -> dict:
    """A figure for the template: the PNG as a data URI, its alt text and caption."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {
        "src": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
        "alt": alt,
        "caption": caption,
    }


def integer_axis(axis) -> None:
    axis.set_major_locator(MaxNLocator(integer=True))


def legend_outside(ax, **kwargs) -> None:
    """A legend under the axes, never over the curves."""
    handles = ax.get_legend_handles_labels()[0]
    if handles:
        ncol = min(len(handles), 3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False, fontsize=10, **kwargs)


def weight_delta_figure(frame: pd.DataFrame) -> Figure:
    """Relative weight change per layer and module group (log scale)."""
    layered = frame[frame["layer"].notna() & (frame["layer"] >= 0)]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for group, sub in layered.groupby("group"):
        ax.plot(sub["layer"].astype(int), sub["relative_change"], marker="o", label=group)
    ax.set(xlabel="layer", ylabel="||sft - base|| / ||base||", title="relative weight change per layer")
    ax.set_yscale("log")
    integer_axis(ax.xaxis)
    legend_outside(ax)
    return fig


def anchor_layers_figure(layers: pd.DataFrame, anchor_layer: int | None) -> Figure:
    """Held-out Cohen's d and AUC per searched layer, the chosen layer marked."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    line = "-" if len(layers) > 2 else "none"  # two searched layers are two points, not a trend
    x = layers["layer"].astype(int)
    ax.plot(x, layers["cohen_d"], marker="o", ls=line, color="tab:blue", label="Cohen's d")
    ax.set(xlabel="layer", ylabel="held-out Cohen's d", title="anchor layer search")
    ax.set_ylim(0, max(float(layers["cohen_d"].max()), 0.0) * 1.1 or 1.0)  # from 0: no zoomed-in axis
    ax2 = ax.twinx()
    ax2.plot(x, layers["auc"], marker="s", ls=line, color="tab:orange", label="AUC")
    ax2.set_ylabel("held-out AUC", color="tab:orange")
    ax2.set_ylim(0, 1.05)
    if anchor_layer is not None:
        ax.axvline(anchor_layer, color="grey", ls="--", lw=1, label="chosen layer")
    integer_axis(ax.xaxis)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False, fontsize=10)
    return fig


def steering_figure(steering: pd.DataFrame) -> dict:
    name = str(steering["metric_name"].dropna().iloc[0]) if "metric_name" in steering.columns else "metric"
    direction = steering["direction"] if "direction" in steering.columns else pd.Series("anchor", index=steering.index)
    curve = steering[direction == "anchor"].sort_values("alpha")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(curve["alpha"], curve["metric"], marker="o", color="tab:blue", label="along the anchor")
    rand = steering[direction == "random"]
    if len(rand):
        agg = rand.groupby("alpha")["metric"].agg(["mean", "std", "size"]).reset_index()
        ax.errorbar(
            agg["alpha"],
            agg["mean"],
            yerr=agg["std"].fillna(0),
            marker="s",
            color="tab:grey",
            capsize=3,
            ls=":",
            label=f"random directions (mean ± sd, {int(agg['size'].max())} draws)",
        )
    references = {"base": ("tab:green", "base model"), "specialized": ("tab:red", "specialized model")}
    for key, (color, label) in references.items():
        ref = steering[direction == key]
        if len(ref):
            ax.axhline(float(ref["metric"].iloc[0]), color=color, ls="--", lw=1, label=label)
    scale = f" (1 = {fmt(steering['scale'].iloc[0], 3)} residual units)" if "scale" in steering.columns else ""
    ax.set(xlabel=f"alpha: anchor gaps added to the base model{scale}", ylabel=name, title="steering check")
    legend_outside(ax)
    n = f" on {int(steering['n_prompts'].iloc[0])} prompts" if "n_prompts" in steering.columns else ""
    caption = f"Behavioural metric{n} of the base model with alpha anchor gaps added at the anchor layer."
    if not len(rand):
        caption += " No random-direction control was recorded in this run."
    return figure(fig, "steering curve", caption)


def _head_matrix(heads: pd.DataFrame, method: str, column: str = "score") -> pd.DataFrame:
    sub = heads[heads["method"] == method]
    return sub.pivot_table(index="layer", columns="index", values=column, aggfunc="first", dropna=False)


def _heatmap(ax, matrix: pd.DataFrame, errors: pd.DataFrame | None, title: str, vmax: float, layers, heads) -> None:
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
    errors = _head_matrix(heads, method, "stderr").reindex_like(matrix)
    layers, index = list(matrix.index), list(matrix.columns)
    vmax = vmax if vmax is not None else float(heads["score"].abs().max()) or 1.0
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(index) + 1.5, 1.2 + 0.7 * len(layers)))
    label = HEAD_PANELS.get(method, method)
    _heatmap(ax, matrix, errors if errors.notna().any().any() else None, label, vmax, layers, index)
    return fig


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


def agreement_figure(both: pd.DataFrame, agree: dict[str, Any]) -> Figure:
    """First order against exact per verified component (± stderr), y = x, the agreement in the title."""
    fig, ax = plt.subplots(figsize=(5.5, 5.2))
    for kind, sub in both.groupby("kind"):
        ax.errorbar(
            sub["first_order"],
            sub["exact"],
            xerr=sub["first_order_stderr"].fillna(0) if "first_order_stderr" in sub else None,
            yerr=sub["exact_stderr"].fillna(0) if "exact_stderr" in sub else None,
            fmt="o",
            ms=4,
            capsize=2,
            label=str(kind),
        )
    lo = float(min(both["first_order"].min(), both["exact"].min()))
    hi = float(max(both["first_order"].max(), both["exact"].max()))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="y = x")
    ax.set(xlabel=f"first-order estimate ({SCORE_UNIT})", ylabel=f"exact ({SCORE_UNIT})")
    ax.set_title(
        f"first order vs exact: Spearman {agree['spearman']:.3f}, top-{agree['k']} overlap "
        f"{agree['overlap']}/{agree['k']}",
        fontsize=10,
    )
    legend_outside(ax)
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


def curve_panel(frame: pd.DataFrame, name: str) -> dict:
    n = int(frame["n_controls"].max()) if "n_controls" in frame else 0
    caption = f"Random controls: {n} random k-subsets of the same kind per k; none where k is the whole kind."
    return figure(curve_figure(frame, name), f"{name} curve", caption)


def _layer_of(name: str) -> int:
    match = re.match(r"L(\d+)\.", name + ".")
    return int(match[1]) if match else -1


def supplier_graph(edges: pd.DataFrame, n: int = 24) -> Figure:
    """The ``n`` strongest edges by |supply|, exact edges first (they are measured, not estimated)."""
    order = edges.assign(_exact=edges["method"] == "exact", _abs=edges["supply"].abs())
    top = order.sort_values(["_exact", "_abs"], ascending=False).head(n)
    suppliers = sorted(set(top["supplier"]), key=lambda name: (_layer_of(name), name))
    targets = sorted(set(top["target"]), key=lambda name: (_layer_of(name), name))
    ys = {name: i / max(len(suppliers) - 1, 1) for i, name in enumerate(suppliers)}
    yt = {name: i / max(len(targets) - 1, 1) for i, name in enumerate(targets)}
    fig, ax = plt.subplots(figsize=(8, max(3.5, 0.28 * max(len(suppliers), len(targets)))))
    wmax = float(top["supply"].abs().max()) or 1.0
    for _, e in top.iterrows():
        color = "tab:red" if e["supply"] > 0 else "tab:blue"
        ls = "-" if e["method"] == "exact" else ":"
        ax.plot(
            [0, 1],
            [ys[e["supplier"]], yt[e["target"]]],
            color=color,
            ls=ls,
            lw=0.5 + 3.5 * abs(e["supply"]) / wmax,
            alpha=0.6,
        )
    for name, y in ys.items():
        ax.text(-0.02, y, name, ha="right", va="center", fontsize=8)
    for name, y in yt.items():
        ax.text(1.02, y, name, ha="left", va="center", fontsize=8)
    ax.set_xlim(-0.5, 1.5)
    ax.axis("off")
    ax.set_title("supplier -> target (solid: exact, dotted: first order)")
    return fig


def objective_figure(curves: pd.DataFrame) -> Figure:
    """Top-k by each objective, recovered in the anchor's and the behaviour's currency (two panels)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, currency in zip(axes, ("anchor", "behaviour"), strict=True):
        for ranking, sub in curves.groupby("ranking", sort=False):
            sub = sub.sort_values("k")
            ax.plot(sub["k"], sub[currency], marker="o", label=f"top-k by {ranking} score")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.axhline(0.0, color="grey", lw=0.8)
        integer_axis(ax.xaxis)
        ax.set(xlabel="k (components patched into the base)", title=f"recovered: fraction of the {currency} gap")
    axes[0].set_ylabel("fraction of gap recovered (1 = specialized)")
    axes[1].legend(fontsize=10)
    return fig
