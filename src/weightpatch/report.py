"""The HTML report of a run directory: one self-contained file, figures embedded as base64 PNG,
rendered through the Jinja2 template ``weightpatch/templates/report.html.j2``.

The page opens with **findings** computed from the run's tables (:func:`findings`): anchor validity,
the top source components with their standard errors, what the top-k recovers against random k,
the roles found, behaviour where measured, and the run's limits (excluded prompts, first-order vs
exact agreement). Then sections appear when their result files exist and are skipped otherwise:

- run: models (source, sha256), library versions, the configs of the commands run;
- weight change per layer (``weight_delta``);
- anchor: held-out separation per layer (``anchor_layers``), steering curve (``steering``) with
  base/specialized references and random-direction controls when recorded;
- layer x head maps: first-order, exact and activation-space scores (``scores``);
- MLP neurons: score distribution per layer and the top neurons of each layer;
- top components: exact vs first-order (``verified``) with a scatter plot (Spearman, top-k overlap);
- sufficiency / necessity curves with random controls;
- hierarchy: supplier graph and tables (``supplier_edges``), roles; merge table and merge evaluation;
  the case study's behaviour table.

All scores are fractions of the anchor gap recovered (1 = the patch moves the anchor score all the
way from the base model's value to the specialized model's) and are shown as ``score ± stderr``
(standard error of the mean across prompts) wherever the table has a standard error.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import jinja2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from weightpatch.errors import WeightPatchError, writing
from weightpatch.figures import (
    SCORE_UNIT,
    curve_figure,
    head_heatmap,
    integer_axis,
    layer_profile,
    legend_outside,
)
from weightpatch.methods import label as method_label
from weightpatch.methods import method_names
from weightpatch.results import ScoreTable, write_text_atomic
from weightpatch.rundir import RUN_FILE
from weightpatch.runs import Run, load_run

MAX_ROWS = 40
METRIC_NAMES = {  # the anchor's metrics in prose
    "cohen_d": "Cohen's d",
    "auc": "AUC",
    "accuracy": "accuracy",
    "mean_gap": "mean anchor gap",
    "direction_norm": "norm of the direction before normalising",
}
TOP_OVERLAP_K = 5  # top-k overlap of first-order and exact rankings in the limits
_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("weightpatch", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)


def template(name: str) -> jinja2.Template:
    """One of the package's Jinja2 templates (``weightpatch/templates/<name>``), autoescaping."""
    return _ENV.get_template(name)


# ---- formatting ------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals (two significant digits below ``10**-digits``, three
    above 10^4; "" for null); lists comma-joined; other values as ``str``."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(str(v) for v in value)
    if value is None or pd.isna(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v != 0 and abs(v) < 10**-digits:
            return f"{v:.2g}"
        return f"{v:.3g}" if abs(v) >= 1e4 else f"{v:.{digits}f}"
    return str(value)


def with_error(score: Any, stderr: Any, digits: int = 3) -> str:
    """``score ± stderr`` (just the score when the standard error is null)."""
    text = fmt(score, digits)
    if not text or stderr is None or pd.isna(stderr):
        return text
    if "e" in text or "." not in text:
        return f"{text} ± {fmt(stderr, digits)}"
    # the error in the score's own format: "0.003 ± 0.001", not "0.003 ± 0.00058"
    decimals = len(text.split(".")[1])
    error = f"{float(stderr):.{decimals}f}"
    return f"{text} ± {error}" if float(error) or not stderr else f"{text} ± <{10**-decimals:.{decimals}f}"


def table(frame: pd.DataFrame, max_rows: int = MAX_ROWS, errors: dict[str, str] | None = None) -> dict:
    """A table for the template: column names, rows of formatted cells, which columns are numeric
    (right-aligned). ``errors`` maps a score column to its stderr column, shown as ``score ±
    stderr`` with the stderr column dropped."""
    errors = {c: e for c, e in (errors or {}).items() if c in frame.columns}
    columns = [c for c in frame.columns if c not in set(errors.values())]
    rows = []
    for _, row in frame.head(max_rows).iterrows():
        rows.append([with_error(row[c], row[errors[c]]) if c in errors else fmt(row[c]) for c in columns])
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]) for c in columns]
    return {
        "columns": [str(c) for c in columns],
        "rows": rows,
        "numeric": numeric,
        "more": max(len(frame) - max_rows, 0),
    }


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


# ---- the run's data, loaded once -------------------------------------------------------------------
class RunData:
    """The tables and records of one run directory that the report reads, through the one reader
    (:func:`weightpatch.runs.load_run`)."""

    def __init__(self, run: Path | Run) -> None:
        self.run = run if isinstance(run, Run) else load_run(run)
        self.path = self.run.path
        self.record: dict = self.run.record
        self.anchor: dict | None = self.run.anchor_record

    def __getitem__(self, name: str) -> pd.DataFrame | None:
        return self.run.table(name)

    def verified(self) -> pd.DataFrame | None:
        """One row per verified component with ``exact``, ``first_order`` and their stderr, by |exact|."""
        from weightpatch.results import ScoreTable

        scores = self["scores"]
        if scores is None:
            return None
        wide = ScoreTable(scores).side_by_side()
        names = self["verified"]["component"] if self["verified"] is not None else None
        if names is not None:
            wide = wide[wide["component"].isin(set(names))]
        elif "exact" in wide.columns:
            wide = wide[wide["exact"].notna()]
        if not len(wide):
            return None
        key = "exact" if "exact" in wide.columns else "first_order"
        return wide.sort_values(key, ascending=False, key=abs, na_position="last").reset_index(drop=True)


# ---- findings ---------------------------------------------------------------------------------------
def agreement(verified: pd.DataFrame, k: int = TOP_OVERLAP_K) -> dict | None:
    """First-order vs exact on the verified components: Spearman rank correlation (scipy) and the
    overlap of the two top-``k`` sets by absolute score."""
    if verified is None or not {"exact", "first_order"} <= set(verified.columns):
        return None
    both = verified.dropna(subset=["exact", "first_order"])
    if len(both) < 3:
        return None
    rho = float(stats.spearmanr(both["first_order"], both["exact"]).statistic)
    k = min(k, len(both))
    top_exact = set(both.loc[both["exact"].abs().nlargest(k).index, "component"])
    top_first = set(both.loc[both["first_order"].abs().nlargest(k).index, "component"])
    return {"spearman": rho, "n": len(both), "k": k, "overlap": len(top_exact & top_first)}


def _curve_findings(frame: pd.DataFrame | None, column: str) -> list[dict]:
    """Per ranking: the largest k that has random controls, the top-k value and the random mean ± std."""
    if frame is None or column not in frame.columns:
        return []
    out = []
    groups = frame.groupby("ranking", sort=False) if "ranking" in frame.columns else [("components", frame)]
    for ranking, sub in groups:
        controlled = sub[sub.get("n_controls", pd.Series(0, index=sub.index)) > 0]
        if not len(controlled):
            continue
        row = controlled.sort_values("k").iloc[-1]
        out.append(
            {
                "ranking": str(ranking),
                "k": int(row["k"]),
                "value": float(row[column]),
                "random_mean": float(row["random_mean"]),
                "random_std": float(row["random_std"]),
                "n_controls": int(row["n_controls"]),
            }
        )
    return out


def findings(data: RunData) -> list[dict]:
    """The summary at the top of the report: ``[{"topic", "text", "values"}]``, every number
    computed from the run's tables (``values`` holds them unformatted, for tests and notebooks)."""
    items: list[dict] = []
    if data.anchor is not None:
        m = data.anchor.get("metrics") or {}
        values = {"layer": data.anchor["layer"], "cohen_d": m.get("cohen_d"), "auc": m.get("auc")}
        text = (
            f"anchor at layer {values['layer']} ({data.anchor.get('method')}): held-out Cohen's d "
            f"{fmt(values['cohen_d'], 2)}, AUC {fmt(values['auc'])}"
        )
        steering = data["steering"]
        if steering is not None:
            curve = steering[steering["direction"] == "anchor"] if "direction" in steering else steering
            curve = curve.sort_values("alpha")
            lo, hi = curve.iloc[0], curve.iloc[-1]
            values.update(steer_alpha=float(hi["alpha"]), steer_from=float(lo["metric"]), steer_to=float(hi["metric"]))
            name = str(steering["metric_name"].dropna().iloc[0]) if "metric_name" in steering else "the metric"
            text += (
                f"; steering the base along it moves {name} from {fmt(lo['metric'], 2)} "
                f"(alpha {fmt(lo['alpha'], 2)}) to {fmt(hi['metric'], 2)} (alpha {fmt(hi['alpha'], 2)})"
            )
            if "direction" in steering:
                rand = steering[(steering["direction"] == "random") & (steering["alpha"] == hi["alpha"])]
                if len(rand):
                    values.update(random_mean=float(rand["metric"].mean()), random_std=float(rand["metric"].std()))
                    text += (
                        f", random directions {with_error(values['random_mean'], values['random_std'], 2)} "
                        f"(mean ± sd, {len(rand)} draws)"
                    )
                ref = steering[steering["direction"] == "specialized"]
                if len(ref):
                    values["specialized"] = float(ref["metric"].iloc[0])
                    text += f"; the specialized model scores {fmt(values['specialized'], 2)}"
        items.append({"topic": "Anchor", "text": text, "values": values})
    verified = data.verified()
    if verified is not None:
        key = "exact" if "exact" in verified.columns and verified["exact"].notna().any() else "first_order"
        top = verified.dropna(subset=[key]).head(3)
        roles = data["roles"]
        role_of = dict(zip(roles["component"], roles["role"].astype(str), strict=True)) if roles is not None else {}
        parts = []
        for _, row in top.iterrows():
            role = f" ({role_of[row['component']]})" if row["component"] in role_of else ""
            parts.append(f"{row['component']} {with_error(row[key], row.get(f'{key}_stderr'))}{role}")
        items.append(
            {
                "topic": "Top components",
                "text": f"largest {key.replace('_', '-')} scores at the source: " + "; ".join(parts),
                "values": {
                    "method": key,
                    "components": top["component"].tolist(),
                    "scores": top[key].tolist(),
                    "stderr": top.get(f"{key}_stderr", pd.Series(np.nan, index=top.index)).tolist(),
                },
            }
        )
    for name, column, verb in (("sufficiency", "recovery", "recovers"), ("necessity", "drop", "removes")):
        curves = _curve_findings(data[name], column)
        if curves:
            text = "; ".join(
                f"{c['ranking']}: top-{c['k']} {verb} {fmt(c['value'])} vs random-{c['k']} "
                f"{with_error(c['random_mean'], c['random_std'])} (mean ± sd of {c['n_controls']})"
                for c in curves
            )
            topic = "Top-k patched into the base" if name == "sufficiency" else "Top-k knocked out"
            items.append({"topic": topic, "text": text, "values": {"curves": curves}})
    roles = data["roles"]
    if roles is not None:
        counts = roles["role"].astype(str).value_counts()
        named = {
            r: roles.loc[roles["role"].astype(str) == r, "component"].head(4).tolist()
            for r in ("source", "router", "both")
        }
        text = "; ".join(
            f"{int(counts.get(r, 0))} {r}" + (f" ({', '.join(named[r])})" if named[r] else "") for r in named
        )
        text += f"; {int(counts.get('neither', 0))} neither, of {len(roles)} components with both scores"
        items.append({"topic": "Roles", "text": text, "values": {r: int(counts.get(r, 0)) for r in counts.index}})
    validity = data.record.get("anchor_validity")
    if validity:
        items.append({"topic": "Anchor validity", "text": validity["line"], "values": dict(validity)})
    behaviour = _behaviour_values(data)
    if behaviour:
        items.append({"topic": "Behaviour", "text": "; ".join(behaviour["texts"]), "values": behaviour["values"]})
    limits, values = [], {}
    screening = data.record.get("screening") or {}
    if screening:
        values.update(n_prompts=screening.get("n_prompts"), n_excluded=screening.get("n_excluded"))
        limits.append(
            f"{screening.get('n_excluded', 0)} of {screening.get('n_prompts')} screening prompts excluded "
            f"(anchor gap too small)"
        )
    agree = agreement(verified)
    if agree:
        values.update(agree)
        limits.append(
            f"first order vs exact on {agree['n']} verified components: Spearman {fmt(agree['spearman'])}, "
            f"top-{agree['k']} overlap {agree['overlap']}/{agree['k']}"
        )
    if limits:
        items.append({"topic": "Limits", "text": "; ".join(limits), "values": values})
    return items


def _behaviour_values(data: RunData) -> dict | None:
    texts, values = [], {}
    for name in ("sufficiency", "necessity"):
        frame = data[name]
        if frame is None:
            continue
        for column, label in (("behavior", "behaviour metric"), ("kl", "KL to the specialized model (nats)")):
            if column in frame.columns and frame[column].notna().any():
                row = frame.dropna(subset=[column]).sort_values("k").iloc[-1]
                values[f"{name}_{column}"] = float(row[column])
                texts.append(f"{name}, top-{int(row['k'])}: {label} {fmt(row[column])}")
    behavior = data["behavior"]
    if behavior is not None:
        numeric = behavior.select_dtypes("number")
        for column in numeric.columns[:3]:
            values[f"behavior_{column}"] = numeric[column].tolist()
        texts.append(f"behaviour table: {len(behavior)} rows ({', '.join(map(str, numeric.columns[:3]))})")
    return {"texts": texts, "values": values} if texts else None


# ---- sections --------------------------------------------------------------------------------------
def _section(title: str, note: str = "", figures: Sequence[dict] = (), tables: Sequence[dict] = (), **extra) -> dict:
    return {"title": title, "note": note, "figures": list(figures), "tables": list(tables), **extra}


def run_section(data: RunData) -> dict:
    record = data.record
    rows = []
    for role in ("base", "specialized"):
        m = (record.get("models") or {}).get(role)
        if m:
            rows.append({"model": role, "source": m.get("source"), "sha256": str(m.get("weights_sha256"))[:16]})
    tables = [{"title": "", "caption": "", **table(pd.DataFrame(rows))}] if rows else []
    versions = ", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items())
    commands = [
        {"name": name, "settings": ", ".join(f"{k}={v}" for k, v in cfg.items())}
        for name, cfg in (record.get("commands") or {}).items()
    ]
    return _section(
        "Run", note=f"Run directory: {data.path.resolve()}", tables=tables, versions=versions, commands=commands
    )


def weight_delta_section(data: RunData) -> dict | None:
    frame = data["weight_delta"]
    if frame is None:
        return None
    layered = frame[frame["layer"].notna() & (frame["layer"] >= 0)]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for group, sub in layered.groupby("group"):
        ax.plot(sub["layer"].astype(int), sub["relative_change"], marker="o", label=group)
    ax.set(xlabel="layer", ylabel="||sft - base|| / ||base||", title="relative weight change per layer")
    ax.set_yscale("log")
    integer_axis(ax.xaxis)
    legend_outside(ax)
    return _section("Weight change", figures=[figure(fig, "relative weight change per layer")])


def anchor_section(data: RunData) -> dict | None:
    figs, paragraphs = [], []
    if data.anchor is not None:
        metrics = ", ".join(
            f"{METRIC_NAMES.get(k, k.replace('_', ' '))} {fmt(v)}"
            for k, v in (data.anchor.get("metrics") or {}).items()
            if isinstance(v, float)
        )
        paragraphs.append(
            f"Anchor at layer {data.anchor['layer']}, method {data.anchor['method']}. Held-out: {metrics}"
        )
    layers = data["anchor_layers"]
    if layers is not None:
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
        if data.anchor is not None:
            ax.axvline(data.anchor["layer"], color="grey", ls="--", lw=1, label="chosen layer")
        integer_axis(ax.xaxis)
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False, fontsize=10)
        figs.append(
            figure(fig, "anchor layer search", "Separation of the two conditions on held-out prompts per layer.")
        )
    steering = data["steering"]
    if steering is not None:
        figs.append(_steering_figure(steering))
    if not figs and not paragraphs:
        return None
    return _section(
        "Anchor",
        note="A valid anchor separates the two conditions on held-out prompts and, added to the base "
        "model's residual stream, raises the behavioural metric more than a random direction of the same size.",
        figures=figs,
        paragraphs=paragraphs,
    )


def _steering_figure(steering: pd.DataFrame) -> dict:
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


def heads_section(data: RunData) -> dict | None:
    scores = data["scores"]
    if scores is None:
        return None
    heads = scores[scores["kind"] == "head"]
    panels = [(m, method_label(m)) for m in method_names() if (heads["method"] == m).any()]
    if not panels:
        return None
    vmax = float(heads["score"].abs().max()) or 1.0
    table = ScoreTable(scores)
    n_cells = table.matrix(panels[0][0], "head").size
    figs = []
    for method, label in panels:
        sub = heads[heads["method"] == method]
        caption = f"{label}: {len(sub)} of {n_cells} heads scored"
        caption += " (grey: not verified exactly)." if len(sub) < n_cells else "."
        figs.append(figure(head_heatmap(table, method, vmax), f"layer x head map, {label}", caption))
    note = (
        "Each cell: the effect of patching one head (rows of W_Q, columns of W_O) from the specialized model, "
        "± its standard error across prompts; one colour scale for every map."
    )
    if not any(m == "activation" for m, _ in panels):
        note += " No activation-space scores in this run."
    return _section("Attention heads: layer x head", note=note, figures=figs)


def _complete(frame: pd.DataFrame, method: str) -> bool:
    """Whether ``method`` scored every component of ``frame``'s kind (not just verified ones)."""
    sub = frame[frame["method"] == method]
    return len(sub) > 0 and sub["component"].nunique() == frame["component"].nunique()


def neurons_section(data: RunData) -> dict | None:
    scores = data["scores"]
    if scores is None:
        return None
    neurons = scores[scores["kind"] == "neuron"]
    method = next((m for m in ("first_order", "exact", "integrated_gradients") if _complete(neurons, m)), None)
    if method is None:
        return None
    sub = neurons[neurons["method"] == method]
    fig = layer_profile(sub, method, "neuron")
    top = (
        sub.assign(abs_score=sub["score"].abs())
        .sort_values("abs_score", ascending=False)
        .groupby("layer")
        .head(3)
        .sort_values(["layer", "abs_score"], ascending=[True, False])[["layer", "component", "score", "stderr"]]
        .rename(columns={"score": method, "stderr": f"{method}_stderr"})
    )
    errors = {method: f"{method}_stderr"}
    for other in [m for m in dict.fromkeys(neurons["method"]) if m != method]:
        extra = neurons[neurons["method"] == other].set_index("component")[["score", "stderr"]]
        top = top.join(extra.rename(columns={"score": other, "stderr": f"{other}_stderr"}), on="component")
        errors[other] = f"{other}_stderr"
    return _section(
        "MLP neurons",
        figures=[figure(fig, "neuron score distributions")],
        tables=[{"title": "Top 3 neurons per layer", "caption": "score ± stderr", **table(top, 60, errors)}],
    )


def components_section(data: RunData) -> dict | None:
    verified = data.verified()
    if verified is None:
        return None
    methods = [m for m in ("exact", "first_order", "integrated_gradients", "activation") if m in verified.columns]
    cols = ["component", "kind", "component_class", *methods, *(f"{m}_stderr" for m in methods)]
    shown = verified[[c for c in cols if c in verified.columns]]
    tables = [
        {
            "title": "",
            "caption": "score ± stderr across prompts",
            **table(shown, errors={m: f"{m}_stderr" for m in methods}),
        }
    ]
    figs = []
    agree = agreement(verified)
    if agree:
        both = verified.dropna(subset=["exact", "first_order"])
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
        figs.append(
            figure(
                fig,
                "first order vs exact",
                f"{agree['n']} verified components; bars: ± stderr across prompts. Spearman rank correlation "
                f"{fmt(agree['spearman'])}; {agree['overlap']} of the top {agree['k']} by |exact| are in the "
                f"top {agree['k']} by |first order|.",
            )
        )
    return _section(
        "Top components",
        note="Exact: the component's specialized weights patched into the base, one forward pass per prompt. "
        "First order: gradient x weight-delta estimate of the same quantity.",
        figures=figs,
        tables=tables,
    )


def _curve_figure(frame: pd.DataFrame, name: str) -> dict:
    n = int(frame["n_controls"].max()) if "n_controls" in frame else 0
    caption = f"Random controls: {n} random k-subsets of the same kind per k; none where k is the whole kind."
    return figure(curve_figure(frame, name), f"{name} curve", caption)


def curves_section(data: RunData) -> dict | None:
    figs, tables = [], []
    for name, column in (("sufficiency", "recovery"), ("necessity", "drop")):
        frame = data[name]
        if frame is None:
            continue
        if {"k", column}.issubset(frame.columns) and "random_mean" in frame.columns:
            figs.append(_curve_figure(frame, name))
        else:
            tables.append({"title": name, "caption": "", **table(frame)})
    if not figs and not tables:
        return None
    return _section(
        "Validation",
        note="Top-k by the screen against random k-subsets of the same pool (mean ± sd): what any k "
        "components would do.",
        figures=figs,
        tables=tables,
    )


def _target_output(targets: Sequence[str]) -> str:
    kinds = set()
    for t in targets:
        kinds.add(
            "head"
            if ".head" in t
            else "MLP"
            if ".mlp" in t
            else "attention block"
            if t.endswith(".attn")
            else "component"
        )
    return " / ".join(sorted(kinds))


def supplier_section(data: RunData) -> dict | None:
    edges = data["supplier_edges"]
    figs, tables = [], []
    target_kinds = ""
    if edges is not None:
        target_kinds = _target_output(list(dict.fromkeys(edges["target"])))
        figs.append(
            figure(
                _supplier_graph(edges),
                "supplier graph",
                "Edge width: supply; red toward the specialized output, blue away.",
            )
        )
        for method in dict.fromkeys(edges["method"]):
            ranked = edges[edges["method"] == method].sort_values("supply", ascending=False, key=abs)
            label = "exact" if method == "exact" else "first-order estimate"
            tables.append(
                {"title": f"Suppliers ranked by {label} supply", "caption": f"{len(ranked)} edges", **table(ranked, 20)}
            )
    overlap = data["supplier_overlap"]
    if overlap is not None:
        tables.append(
            {
                "title": "Traced suppliers vs Weight Patching top-k (neurons)",
                "caption": "fraction: share of the k strongest traced neuron suppliers that are also in the "
                "first-order Weight Patching top-k (the paper reports about 0.75).",
                **table(overlap),
            }
        )
    levels = data["hierarchy"]
    if levels is not None:
        from weightpatch.components import Component

        layers = pd.array([Component.parse(c).layer for c in levels["component"]], dtype="Int64")
        levels = levels.assign(layer=layers)  # model-level modules have no layer (older runs wrote num_layers)
        tables.append(
            {
                "title": "Hierarchy levels (source -> router -> execution -> unembedding)",
                "caption": "layer empty: a model-level module (final norm, unembedding).",
                **table(levels),
            }
        )
    roles = data["roles"]
    if roles is not None:
        shown, errors, method = _roles_with_errors(roles, data["scores"])
        caption = f"activation- vs weight-space ({method}) effect, ± stderr across prompts"
        tables.append({"title": "Roles", "caption": caption, **table(shown, errors=errors)})
    if not figs and not tables:
        return None
    target = f"target {target_kinds}" if target_kinds else "target"
    return _section(
        "Hierarchy: suppliers -> targets",
        note=f"Suppliers: upstream components whose weight patch moves the {target}'s output toward its specialized "
        "value (fraction of that output difference recovered). Exact and first-order edges are ranked separately.",
        figures=figs,
        tables=tables,
    )


def _roles_with_errors(roles: pd.DataFrame, scores: pd.DataFrame | None) -> tuple[pd.DataFrame, dict, str]:
    """The roles table with the standard errors of its two scores looked up in ``scores``, the
    weight one from the method the roles table records (a table written before it recorded one shows
    the weight column without an error rather than with another method's)."""
    if scores is None:
        return roles, {}, "weight"
    by_method = {m: sub.set_index("component") for m, sub in scores.groupby("method")}
    method = str(roles["weight_method"].iloc[0]) if "weight_method" in roles.columns else None
    shown = roles.copy()
    for column, m in (("activation", "activation"), ("weight", method)):
        if m is not None and m in by_method:
            shown[f"{column}_stderr"] = roles["component"].map(by_method[m]["stderr"])
    errors = {c: f"{c}_stderr" for c in ("activation", "weight") if f"{c}_stderr" in shown}
    return shown, errors, method or "weight"


def _layer_of(name: str) -> int:
    match = re.match(r"L(\d+)\.", name + ".")
    return int(match[1]) if match else -1


def _supplier_graph(edges: pd.DataFrame, n: int = 24):
    """The ``n`` strongest edges by |supply|, exact edges first (they are measured, not estimated)."""
    order = edges.assign(_exact=edges["method"] == "exact", _abs=edges["supply"].abs())
    top = order.sort_values(["_exact", "_abs"], ascending=False).head(n)
    suppliers = sorted(set(top["supplier"]), key=lambda n: (_layer_of(n), n))
    targets = sorted(set(top["target"]), key=lambda n: (_layer_of(n), n))
    ys = {n: i / max(len(suppliers) - 1, 1) for i, n in enumerate(suppliers)}
    yt = {n: i / max(len(targets) - 1, 1) for i, n in enumerate(targets)}
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
    for n, y in ys.items():
        ax.text(-0.02, y, n, ha="right", va="center", fontsize=8)
    for n, y in yt.items():
        ax.text(1.02, y, n, ha="left", va="center", fontsize=8)
    ax.set_xlim(-0.5, 1.5)
    ax.axis("off")
    ax.set_title("supplier -> target (solid: exact, dotted: first order)")
    return fig


def objective_section(data: RunData) -> dict | None:
    """Anchor vs behaviour objective (a behaviour run): the top-k by each objective measured in both
    currencies, and the rank agreement of the two objectives' first-order scores per kind."""
    curves, agree = data["currency_curves"], data["objective_agreement"]
    if curves is None:
        return None
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
    figures = [
        figure(
            fig,
            "sufficiency curves by each objective in both currencies",
            "Where the two panels differ, the anchor and the behaviour locate the capability in different places.",
        )
    ]
    tables = []
    if agree is not None:
        per_kind = agree[agree["layer"].isna()].drop(columns=["layer"])
        tables.append({"title": "rank agreement per kind (first order)", "caption": "", **table(per_kind)})
    return _section("Anchor vs behaviour objective", figures=figures, tables=tables)


def simple_section(data: RunData, name: str, title: str, note: str = "") -> dict | None:
    frame = data[name]
    return None if frame is None else _section(title, note=note, tables=[{"title": "", "caption": "", **table(frame)}])


# ---- the report ------------------------------------------------------------------------------------
def render(run_dir: str | os.PathLike) -> str:
    """The report page of a run directory as HTML text."""
    run = Path(run_dir)
    if not (run / RUN_FILE).is_file():
        raise WeightPatchError(f"{run} is not a weightpatch run directory (no {RUN_FILE})")
    data = RunData(run)
    sections = [
        run_section(data),
        weight_delta_section(data),
        anchor_section(data),
        heads_section(data),
        neurons_section(data),
        components_section(data),
        curves_section(data),
        objective_section(data),
        supplier_section(data),
        simple_section(
            data,
            "anchor_validity",
            "Anchor validity",
            note="The top-k components patched into the base, measured in both currencies: the fraction of the "
            "anchor gap and of the behaviour gap (teacher-forced log-probability of the specialized model's "
            "responses) recovered, against random k-subsets of the same kind.",
        ),
        simple_section(data, "merge_table", "Merges"),
        simple_section(
            data,
            "behavior",
            "Behaviour",
            note="Anchor recovery does not by itself mean the behaviour is recovered: output KL to the "
            "specialized model and checker accuracy of generations.",
        ),
        simple_section(
            data,
            "merge_evaluation",
            "Merge evaluation",
            note="Anchor recovery does not by itself mean the behaviour is recovered: strict accuracy of "
            "generations and KL to each expert, per merged model and capability.",
        ),
    ]
    return template("report.html.j2").render(
        findings=findings(data), sections=[s for s in sections if s], score_unit=SCORE_UNIT
    )


def build_report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write ``report.html`` (or ``output``) for a run directory and return its path."""
    doc = render(run_dir)
    path = Path(output) if output is not None else Path(run_dir) / "report.html"
    with writing(path.parent, "--output"):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, doc)
    return path


def embedded_images(text: str) -> list[bytes]:
    """The decoded bytes of every ``data:image/png;base64`` image in a report."""
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


__all__ = ["build_report", "embedded_images", "findings", "render"]
