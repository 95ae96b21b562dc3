"""The trace stage: sources vs routers in a run directory that has an anchor (docs/method.md,
"Activation patching and roles" and "Supplier tracing and hierarchy").

Steps, each skipped when the run directory already has its result: activation-space scores of heads
and attention/MLP blocks (``scores``, method ``activation``); first-order scores of the kinds the run
lacks; roles from activation vs weight-space scores (``roles``); supplier tracing of ``targets``, or
of the strongest carriers (router/both components above layer 0) (``supplier_edges``, ``hierarchy``,
``supplier_overlap``); sufficiency and necessity curves with random controls for blocks, heads and
neurons ranked by the first-order screen (``sufficiency``, ``necessity``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from weightpatch.activation import activation_scores, default_components
from weightpatch.config import TraceConfig
from weightpatch.errors import WeightPatchError
from weightpatch.pair import ModelPair
from weightpatch.pipeline.forecast import forecast
from weightpatch.pipeline.inputs import scoring_objective, scoring_run
from weightpatch.results import ScoreTable
from weightpatch.roles import assign_roles
from weightpatch.rundir import RunDir
from weightpatch.scoring import GapScorer
from weightpatch.screening.first_order import gradient_scores
from weightpatch.tracing import hierarchy, supplier_overlap, trace_suppliers
from weightpatch.validation import necessity_curve, sufficiency_curve

logger = logging.getLogger("weightpatch")
OVERLAP_KS = (5, 10, 20)
CURVE_KS = {"attention/MLP blocks": [1, 2, 4, 8], "heads": [1, 2, 4, 8], "neurons": [1, 4, 16, 64]}


@dataclass
class TraceResult:
    scores: ScoreTable
    roles: pd.DataFrame
    supplier_edges: pd.DataFrame
    run_dir: Path


def carrier_targets(roles: pd.DataFrame | None, table: ScoreTable, n: int = 3) -> list[str]:
    """Targets for supplier tracing: components whose activation carries the state (router or both)
    and that have upstream layers, strongest first; else the strongest activation-space heads above
    layer 0."""
    if roles is not None and len(roles):
        carriers = roles[roles["role"].isin(["router", "both"]) & (roles["layer"] > 0) & (roles["kind"] != "layer")]
        if len(carriers):
            return carriers.sort_values("activation", ascending=False, key=abs)["component"].head(n).tolist()
    upstream = ScoreTable(table.select("activation", "head").frame.query("layer > 0"))
    return upstream.top(n, by_abs=True).components()


def curve_rankings(table: ScoreTable) -> dict[str, ScoreTable]:
    """Three rankings of disjoint components by first-order score: attention/MLP blocks, heads, neurons."""
    first = table.select("first_order").frame
    blocks = first[(first["kind"] == "module") & first["component"].str.fullmatch(r"L\d+\.(attn|mlp)")]
    return {
        "attention/MLP blocks": ScoreTable(blocks),
        "heads": table.select("first_order", "head"),
        "neurons": table.select("first_order", "neuron"),
    }


def validation_step(run: RunDir, scorer: GapScorer, table: ScoreTable, cfg: TraceConfig) -> None:
    """Sufficiency and necessity curves, top-k by the first-order screen vs random k."""
    rankings = curve_rankings(table)
    for name, curve_of in (("sufficiency", sufficiency_curve), ("necessity", necessity_curve)):
        if run.has(name):
            continue
        curves = []
        logger.info("%s curves (top-k vs random-k)", name)
        for label, ranked in rankings.items():
            ks = [k for k in CURVE_KS[label] if k <= len(ranked)]
            if ks:
                curve = curve_of(
                    scorer, ranked, ks=ks, method="first_order", controls=cfg.random_controls, seed=cfg.seed
                )
                curves.append(curve.assign(ranking=label))
        if curves:
            run.save_table(name, pd.concat(curves, ignore_index=True))


def trace_steps(cfg: TraceConfig, scorer: GapScorer, run: RunDir) -> None:
    """Every step of the stage on one objective (the anchor or the behaviour scorer), each skipped when
    ``run`` has its result."""
    pair = scorer.pair
    if not (run.scores().frame["method"] == "activation").any():
        components = default_components(pair.space, kinds=("module", "head"))
        run.append_scores(activation_scores(scorer, components, progress=cfg.progress))
    have = set(run.scores().select("first_order").frame["kind"])
    missing = [kind for kind in ("layer", "module", "head", "neuron") if kind not in have]
    if missing:  # the rankings behind roles and curves need every kind screened
        per_prompt = cfg.first_order_stderr
        run.append_scores(gradient_scores(scorer, kinds=missing, per_prompt=per_prompt, progress=cfg.progress))
    table = run.scores()
    if not run.has("roles"):
        weight_method = "exact" if (table.frame["method"] == "exact").any() else "first_order"
        run.save_table("roles", assign_roles(table, table, weight_method=weight_method))
    if not run.has("supplier_edges"):
        names = [str(pair.space.parse(t)) for t in cfg.targets or []]
        names = names or carrier_targets(run.load_table("roles"), table, cfg.n_targets)
        if not names:
            raise WeightPatchError("no targets to trace: pass --targets (no component carries the state above layer 0)")
        logger.info("tracing suppliers of %s", ", ".join(names))
        verify = cfg.verify_top if cfg.method == "first_order" else 0
        edges = trace_suppliers(
            scorer, names, kinds=("head", "neuron"), method=cfg.method, verify_top=verify,
            min_relative_gap=cfg.min_relative_gap,
        )  # fmt: skip
        run.save_table("supplier_edges", edges)
    edges = run.load_table("supplier_edges")
    if not run.has("hierarchy"):
        levels = hierarchy(edges, pair.space, scorer.stop, run.load_table("roles"), k=5, min_supply=0.0)
        run.save_table("hierarchy", levels)
    if not run.has("supplier_overlap"):
        overlaps = [supplier_overlap(edges, table, k=k, method="first_order", kind="neuron") for k in OVERLAP_KS]
        run.save_table(
            "supplier_overlap",
            pd.DataFrame([{"k": o["k"], "fraction": o["fraction"], "shared": list(o["shared"])} for o in overlaps]),
        )
    validation_step(run, scorer, table, cfg)


def run_trace(cfg: TraceConfig, pair: ModelPair | None = None) -> TraceResult:
    """Activation-space scores, roles, supplier tracing and validation curves in ``cfg``'s run directory."""
    forecast("trace", cfg, pair)
    with scoring_run(cfg, "trace", pair, cfg.targets or []) as (run, scorer):
        trace_steps(cfg, scoring_objective(cfg, run, scorer), run)
        return TraceResult(run.scores(), run.load_table("roles"), run.load_table("supplier_edges"), run.path)
