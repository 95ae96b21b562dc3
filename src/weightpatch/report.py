"""The HTML report of a run directory: one self-contained file, figures embedded as base64 PNG.

Sections appear when their result files exist in the run directory and are skipped otherwise:

- run: models (source, sha256), library versions, the configs of the commands run;
- weight change per layer (``weight_delta``, from ``wpatch check --run-dir``);
- anchor: held-out separation per layer (``anchor_layers``), steering curve (``steering``);
- layer x head heatmaps: weight-space scores beside activation-space ones (``scores``);
- MLP neurons: score distribution per layer and the top neurons of each layer;
- top components: exact vs first-order (``verified``) with a scatter plot;
- sufficiency / necessity curves with random controls, interactions;
- roles, supplier graph (``roles``, ``supplier_edges``); merge table; behaviour.

All scores are fractions of the anchor gap recovered (1 = the patch moves the anchor score all the
way from the base model's value to the specialized model's).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from weightpatch.errors import WeightPatchError
from weightpatch.results import read_table, write_text_atomic
from weightpatch.rundir import RUN_FILE, RunDir

SCORE_UNIT = "fraction of anchor gap recovered"
MAX_ROWS = 40

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto}.row{display:flex;flex-wrap:wrap;gap:1em}.row>figure{flex:1 1 480px;margin:0}
.note{color:#555;font-size:14px}code{background:#f5f5f5;padding:1px 4px}
"""


# ---- building blocks -------------------------------------------------------------------------------
def figure_html(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def table_html(frame: pd.DataFrame, max_rows: int = MAX_ROWS) -> str:
    shown = frame.head(max_rows)
    body = shown.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="", border=0, escape=True)
    more = f'<p class="note">{len(frame) - max_rows} more rows in the table file.</p>' if len(frame) > max_rows else ""
    return body + more


def section(title: str, *parts: str, note: str = "") -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f"<section><h2>{html.escape(title)}</h2>{note_html}{''.join(parts)}</section>"


def _load(run: Path, name: str) -> pd.DataFrame | None:
    frame = RunDir(run).load_table(name)  # scores with their pending rows; a corrupt file is a clear error
    if frame is not None:
        return frame
    csv = run / f"{name}.csv"
    return read_table(csv) if csv.is_file() else None


def _first_col(frame: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((c for c in names if c in frame.columns), None)


# ---- sections --------------------------------------------------------------------------------------
def run_section(run: Path) -> str:
    record = json.loads((run / RUN_FILE).read_text())
    rows = []
    for role in ("base", "specialized"):
        m = (record.get("models") or {}).get(role)
        if m:
            rows.append({"model": role, "source": m.get("source"), "sha256": str(m.get("weights_sha256"))[:16]})
    parts = [table_html(pd.DataFrame(rows))] if rows else []
    versions = record.get("versions") or {}
    if versions:
        parts.append("<p>" + ", ".join(f"{html.escape(k)} {html.escape(str(v))}" for k, v in versions.items()) + "</p>")
    commands = record.get("commands") or {}
    for name, cfg in commands.items():
        items = ", ".join(f"{html.escape(str(k))}={html.escape(str(v))}" for k, v in cfg.items())
        parts.append(f"<p><code>wpatch {html.escape(name)}</code>: {items}</p>")
    return section("Run", *parts, note=f"Run directory: {html.escape(str(run.resolve()))}")


def weight_delta_section(run: Path) -> str:
    frame = _load(run, "weight_delta")
    if frame is None or not len(frame):
        return ""
    layered = frame[frame["layer"] >= 0]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for group, sub in layered.groupby("group"):
        ax.plot(sub["layer"], sub["relative_change"], marker="o", label=group)
    ax.set(xlabel="layer", ylabel="||sft - base|| / ||base||", title="relative weight change per layer")
    ax.set_yscale("log")
    ax.legend()
    return section("Weight change", figure_html(fig, "relative weight change per layer"))


def anchor_section(run: Path) -> str:
    parts = []
    meta_path = run / "anchor.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        metrics = ", ".join(f"{k} {v:.3g}" for k, v in (meta.get("metrics") or {}).items() if isinstance(v, float))
        parts.append(
            f"<p>Anchor at layer <b>{meta['layer']}</b>, method <code>{html.escape(meta['method'])}</code>. "
            f"Held-out: {html.escape(metrics)}</p>"
        )
    layers = _load(run, "anchor_layers")
    figs = []
    if layers is not None and len(layers):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(layers["layer"], layers["cohen_d"], marker="o", color="tab:blue")
        ax.set(xlabel="layer", ylabel="held-out Cohen's d", title="anchor layer search")
        ax2 = ax.twinx()
        ax2.plot(layers["layer"], layers["auc"], marker="s", color="tab:orange")
        ax2.set_ylabel("held-out AUC", color="tab:orange")
        ax2.set_ylim(0, 1.05)
        if meta_path.is_file():
            ax.axvline(json.loads(meta_path.read_text())["layer"], color="grey", ls="--", lw=1)
        figs.append(figure_html(fig, "anchor layer search"))
    steering = _load(run, "steering")
    if steering is not None and len(steering):
        name = str(steering["metric_name"].iloc[0]) if "metric_name" in steering.columns else "metric"
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steering["alpha"], steering["metric"], marker="o")
        ax.set(xlabel="alpha (anchor gaps added to the base model)", ylabel=name, title="steering check")
        figs.append(figure_html(fig, "steering curve"))
    if not parts and not figs:
        return ""
    return section(
        "Anchor",
        *parts,
        f'<div class="row">{"".join(figs)}</div>',
        note="A valid anchor separates the two conditions on held-out prompts and, added to the base "
        "model's residual stream, raises the behavioural metric.",
    )


def _heatmap(ax, matrix: pd.DataFrame, title: str, vmax: float) -> None:
    im = ax.imshow(matrix.to_numpy(dtype=float), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set(xlabel="head", ylabel="layer", title=title)
    ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns])
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i in matrix.index])
    plt.colorbar(im, ax=ax, label=SCORE_UNIT, shrink=0.85)


def heads_section(scores: pd.DataFrame | None) -> str:
    if scores is None:
        return ""
    heads = scores[scores["kind"] == "head"]
    panels = []
    weight_method = next(
        (m for m in ("exact", "first_order", "integrated_gradients") if _complete(heads, m)),
        next((m for m in ("first_order", "exact") if (heads["method"] == m).any()), None),
    )
    if weight_method:
        panels.append((f"weight space ({weight_method})", weight_method))
    if (heads["method"] == "activation").any():
        panels.append(("activation space", "activation"))
    if not panels:
        return ""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, method) in zip(axes[0], panels, strict=True):
        sub = heads[heads["method"] == method]
        matrix = sub.pivot_table(index="layer", columns="index", values="score", aggfunc="first")
        vmax = float(np.nanmax(np.abs(matrix.to_numpy(dtype=float)))) or 1.0
        _heatmap(ax, matrix, f"heads, {title}", vmax)
    note = "Each cell: the effect of patching one head (rows of W_Q, columns of W_O) from the specialized model."
    if len(panels) == 1:
        note += " No activation-space scores in this run."
    return section("Attention heads: layer x head", figure_html(fig, "layer x head heatmaps"), note=note)


def _complete(frame: pd.DataFrame, method: str) -> bool:
    """Whether ``method`` scored every component of ``frame``'s kind (not just verified ones)."""
    sub = frame[frame["method"] == method]
    return len(sub) > 0 and sub["component"].nunique() == frame["component"].nunique()


def neurons_section(scores: pd.DataFrame | None) -> str:
    if scores is None:
        return ""
    neurons = scores[scores["kind"] == "neuron"]
    method = next((m for m in ("first_order", "exact", "integrated_gradients") if _complete(neurons, m)), None)
    if method is None:
        return ""
    sub = neurons[neurons["method"] == method]
    layers = sorted(sub["layer"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    axes[0].boxplot([sub[sub["layer"] == layer]["score"].to_numpy() for layer in layers], showfliers=True)
    axes[0].set_xticks(range(1, len(layers) + 1), [str(layer) for layer in layers])
    axes[0].set(xlabel="layer", ylabel=SCORE_UNIT, title=f"neuron scores per layer ({method})")
    agg = sub.groupby("layer")["score"]
    axes[1].bar(layers, agg.apply(lambda s: s.abs().sum()).to_numpy(), color="tab:purple")
    axes[1].set(xlabel="layer", ylabel=f"sum of |score| ({SCORE_UNIT})", title="total neuron effect per layer")
    top = (
        sub.assign(abs_score=sub["score"].abs())
        .sort_values("abs_score", ascending=False)
        .groupby("layer")
        .head(3)
        .sort_values(["layer", "abs_score"], ascending=[True, False])[["layer", "component", "score"]]
    )
    other = neurons[neurons["method"] != method]
    if len(other):
        extra = other.pivot_table(index="component", columns="method", values="score", aggfunc="first")
        top = top.join(extra, on="component")
    return section(
        "MLP neurons",
        figure_html(fig, "neuron score distributions"),
        "<h3>Top 3 neurons per layer</h3>",
        table_html(top.rename(columns={"score": method}), max_rows=60),
    )


def components_section(run: Path, scores: pd.DataFrame | None) -> str:
    verified = _load(run, "verified")
    if verified is None and scores is not None and len(scores):
        verified = scores.pivot_table(
            index=["component", "kind", "layer", "index"], columns="method", values="score", aggfunc="first"
        ).reset_index()
    if verified is None or not len(verified):
        return ""
    key = "exact" if "exact" in verified.columns else _first_col(verified, ("first_order", "activation", "score"))
    verified = verified.sort_values(key, ascending=False, key=abs) if key else verified
    cols = [
        c for c in ("component", "kind", "exact", "first_order", "integrated_gradients", "activation") if c in verified
    ]
    parts = [table_html(verified[cols])]
    if {"exact", "first_order"} <= set(verified.columns):
        both = verified.dropna(subset=["exact", "first_order"])
        if len(both) >= 2:
            fig, ax = plt.subplots(figsize=(5.5, 5))
            for kind, sub in both.groupby("kind"):
                ax.scatter(sub["first_order"], sub["exact"], label=kind, s=22)
            lo = float(min(both["first_order"].min(), both["exact"].min()))
            hi = float(max(both["first_order"].max(), both["exact"].max()))
            ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
            ax.set(xlabel=f"first-order estimate ({SCORE_UNIT})", ylabel=f"exact ({SCORE_UNIT})")
            ax.set_title("screen-then-verify: first order vs exact")
            ax.legend()
            parts.insert(0, figure_html(fig, "first order vs exact"))
    return section(
        "Top components",
        *parts,
        note="Exact: the component's specialized weights patched into the base, one forward pass per prompt. "
        "First order: gradient x weight-delta estimate of the same quantity.",
    )


def curves_section(run: Path) -> str:
    figs, tables = [], []
    for name, label in (
        ("sufficiency", "sufficiency: top-k patched into base"),
        ("necessity", "necessity: top-k knocked out of specialized"),
    ):
        frame = _load(run, name)
        if frame is None or not len(frame):
            continue
        x = _first_col(frame, ("k", "n_components", "top_k", "size"))
        y = _first_col(frame, ("recovery", "drop", "fraction", "score", "value", "mean", "effect"))
        group = _first_col(frame, ("selection", "control", "condition", "set", "kind", "method"))
        if x is None or y is None:
            tables.append(f"<h3>{name}</h3>" + table_html(frame))
            continue
        fig, ax = plt.subplots(figsize=(6, 3.8))
        if "random_mean" in frame.columns:  # wide form: top-k column plus random-control mean and std
            rankings = frame.groupby("ranking", sort=False) if "ranking" in frame.columns else [("", frame)]
            for ranking, sub in rankings:
                prefix = f"{ranking}: " if ranking else ""
                line = ax.plot(sub[x], sub[y], marker="o", label=f"{prefix}top-k")[0]
                std = sub["random_std"].fillna(0) if "random_std" in sub.columns else 0
                ax.plot(sub[x], sub["random_mean"], ls="--", color=line.get_color(), label=f"{prefix}random k")
                ax.fill_between(
                    sub[x], sub["random_mean"] - std, sub["random_mean"] + std, color=line.get_color(), alpha=0.15
                )
            if frame[x].max() > 16:
                ax.set_xscale("log", base=2)
            group = None
            frame = frame.iloc[0:0]
        for g, sub in frame.groupby(group) if group else ([(name, frame)] if len(frame) else []):
            sub = sub.groupby(x, as_index=False).agg(
                y=(y, "mean"), lo=(y, lambda s: s.quantile(0.1)), hi=(y, lambda s: s.quantile(0.9))
            )
            line = ax.plot(sub[x], sub["y"], marker="o", label=str(g))[0]
            if (sub["hi"] > sub["lo"]).any():
                ax.fill_between(sub[x], sub["lo"], sub["hi"], color=line.get_color(), alpha=0.2)
        ax.set(
            xlabel="k (components)", ylabel=SCORE_UNIT if name == "sufficiency" else "fraction of anchor gap removed"
        )
        ax.set_title(label)
        ax.legend()
        figs.append(figure_html(fig, f"{name} curve"))
    interactions = _load(run, "interactions")
    if interactions is not None and len(interactions):
        tables.append("<h3>Interactions</h3>" + table_html(interactions))
    if not figs and not tables:
        return ""
    return section(
        "Validation",
        f'<div class="row">{"".join(figs)}</div>',
        *tables,
        note="Random-k controls (shaded: their spread) show what any k components would do.",
    )


def supplier_section(run: Path) -> str:
    roles = _load(run, "roles")
    edges = _load(run, "supplier_edges")
    parts = []
    if edges is not None and len(edges):
        src = _first_col(edges, ("supplier", "source", "upstream"))
        dst = _first_col(edges, ("target", "destination", "downstream"))
        w = _first_col(edges, ("supply", "score", "weight", "effect", "recovery"))
        if src and dst and w:
            parts.append(figure_html(_supplier_graph(edges, src, dst, w), "supplier graph"))
        parts.append(table_html(edges.sort_values(w, ascending=False, key=abs) if w else edges))
    overlap = _load(run, "supplier_overlap")
    if overlap is not None and len(overlap):
        parts.append(
            "<h3>Traced suppliers vs Weight Patching top-k (neurons)</h3>"
            + table_html(overlap)
            + '<p class="note">fraction: share of the k strongest traced neuron suppliers that are also in the '
            "first-order Weight Patching top-k (the paper reports about 0.75).</p>"
        )
    levels = _load(run, "hierarchy")
    if levels is not None and len(levels):
        parts.append("<h3>Hierarchy levels (source -> router -> execution -> unembedding)</h3>" + table_html(levels))
    if roles is not None and len(roles):
        parts.append("<h3>Roles</h3>" + table_html(roles))
    if not parts:
        return ""
    return section(
        "Hierarchy: suppliers -> targets",
        *parts,
        note="Suppliers: upstream components whose weight patch moves a target head's output toward its "
        "specialized value. Edge width: supplier score.",
    )


def _layer_of(name: str) -> int:
    if name.startswith("L") and name[1:].split(".")[0].isdigit():
        return int(name[1:].split(".")[0])
    return -1


def _supplier_graph(edges: pd.DataFrame, src: str, dst: str, w: str):
    top = edges.reindex(edges[w].abs().sort_values(ascending=False).index).head(40)
    suppliers = sorted(set(top[src]), key=lambda n: (_layer_of(n), n))
    targets = sorted(set(top[dst]), key=lambda n: (_layer_of(n), n))
    ys = {n: i / max(len(suppliers) - 1, 1) for i, n in enumerate(suppliers)}
    yt = {n: i / max(len(targets) - 1, 1) for i, n in enumerate(targets)}
    fig, ax = plt.subplots(figsize=(8, max(3.5, 0.28 * max(len(suppliers), len(targets)))))
    wmax = float(top[w].abs().max()) or 1.0
    for _, e in top.iterrows():
        color = "tab:red" if e[w] > 0 else "tab:blue"
        ax.plot([0, 1], [ys[e[src]], yt[e[dst]]], color=color, lw=0.5 + 3.5 * abs(e[w]) / wmax, alpha=0.6)
    for n, y in ys.items():
        ax.text(-0.02, y, n, ha="right", va="center", fontsize=8)
    for n, y in yt.items():
        ax.text(1.02, y, n, ha="left", va="center", fontsize=8)
    ax.set_xlim(-0.5, 1.5)
    ax.axis("off")
    ax.set_title("supplier -> target (red: toward the specialized output, blue: away)")
    return fig


def simple_table_section(run: Path, name: str, title: str, note: str = "") -> str:
    frame = _load(run, name)
    if frame is None or not len(frame):
        return ""
    return section(title, table_html(frame), note=note)


# ---- the report ------------------------------------------------------------------------------------
def build_report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write ``report.html`` (or ``output``) for a run directory and return its path."""
    run = Path(run_dir)
    if not (run / RUN_FILE).is_file():
        raise WeightPatchError(f"{run} is not a weightpatch run directory (no {RUN_FILE})")
    scores = _load(run, "scores")
    body = [
        run_section(run),
        weight_delta_section(run),
        anchor_section(run),
        heads_section(scores),
        neurons_section(scores),
        components_section(run, scores),
        curves_section(run),
        supplier_section(run),
        simple_table_section(run, "merge_table", "Merges"),
        simple_table_section(
            run,
            "behavior",
            "Behaviour",
            note="Anchor recovery does not by itself mean the behaviour is recovered: output KL to the "
            "specialized model and checker accuracy of generations.",
        ),
    ]
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Weight Patching report</title>'
        f"<style>{CSS}</style></head><body><h1>Weight Patching report</h1>"
        f'<p class="note">Scores are in units of the {SCORE_UNIT}: 1 = the patch moves the anchor score from the '
        "base model's value all the way to the specialized model's; 0 = no change.</p>"
        + "".join(b for b in body if b)
        + "</body></html>\n"
    )
    path = Path(output) if output is not None else run / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, doc)
    return path


def embedded_images(text: str) -> list[bytes]:
    """The decoded bytes of every ``data:image/png;base64`` image in a report."""
    import re

    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


__all__ = ["build_report", "embedded_images"]
