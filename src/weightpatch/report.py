"""The HTML report of a run directory: one self-contained file, figures embedded as base64 PNG,
rendered through the Jinja2 template ``weightpatch/templates/report.html.j2``.

Presentation only: the page opens with the **findings** of :mod:`weightpatch.analysis` (pure
functions over the run's tables; :func:`findings`): anchor validity,
the top source components with their standard errors, what the top-k recovers against random k,
the roles found, behaviour where measured, and the run's limits (excluded prompts, first-order vs
exact agreement). Then sections appear when their result files exist and are skipped otherwise (their
figures are :mod:`weightpatch.figures`'):

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
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from weightpatch import analysis
from weightpatch.analysis import agreement, fmt, with_error
from weightpatch.display import template
from weightpatch.errors import WeightPatchError, writing
from weightpatch.figures import (
    SCORE_UNIT,
    agreement_figure,
    anchor_layers_figure,
    curve_figure,
    curve_panel,
    figure,
    head_heatmap,
    layer_profile,
    objective_figure,
    steering_figure,
    supplier_graph,
    weight_delta_figure,
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


# ---- formatting ------------------------------------------------------------------------------------
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
        """The verified components side by side, by |exact| (:func:`weightpatch.analysis.verified`)."""
        return analysis.verified(self.run)


def findings(data: RunData | Run) -> list[analysis.Finding]:
    """The findings the page opens with (:func:`weightpatch.analysis.findings`)."""
    return analysis.findings(data.run if isinstance(data, RunData) else data)


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
    fig = weight_delta_figure(frame)
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
        fig = anchor_layers_figure(layers, data.anchor["layer"] if data.anchor is not None else None)
        figs.append(
            figure(fig, "anchor layer search", "Separation of the two conditions on held-out prompts per layer.")
        )
    steering = data["steering"]
    if steering is not None:
        figs.append(steering_figure(steering))
    if not figs and not paragraphs:
        return None
    return _section(
        "Anchor",
        note="A valid anchor separates the two conditions on held-out prompts and, added to the base "
        "model's residual stream, raises the behavioural metric more than a random direction of the same size.",
        figures=figs,
        paragraphs=paragraphs,
    )


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
    fig = layer_profile(sub, method)
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
        fig = agreement_figure(both, agree)
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


def curves_section(data: RunData) -> dict | None:
    figs, tables = [], []
    for name, column in (("sufficiency", "recovery"), ("necessity", "drop")):
        frame = data[name]
        if frame is None:
            continue
        if {"k", column}.issubset(frame.columns) and "random_mean" in frame.columns:
            figs.append(curve_panel(frame, name))
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
                supplier_graph(edges),
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


def objective_section(data: RunData) -> dict | None:
    """Anchor vs behaviour objective (a behaviour run): the top-k by each objective measured in both
    currencies, and the rank agreement of the two objectives' first-order scores per kind."""
    curves, agree = data["currency_curves"], data["objective_agreement"]
    if curves is None:
        return None
    fig = objective_figure(curves)
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


# figures and number formats keep their old import path here (docs/patterns.md)
__all__ = ["build_report", "curve_figure", "embedded_images", "findings", "fmt", "head_heatmap", "render", "with_error"]
