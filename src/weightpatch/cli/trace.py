"""``wpatch trace``: sources vs routers (SPEC sections 7-8) in a run directory that has an anchor.

Stages, each skipped when the run directory already has its result: activation-space scores of
heads and attention/MLP blocks (``scores``, method ``activation``); first-order scores if
``wpatch screen`` has not run; roles from activation vs weight-space scores (``roles``); supplier
tracing of ``--targets``, or of the strongest carriers (router/both components above layer 0)
(``supplier_edges``); sufficiency and necessity curves with random controls for blocks, heads and
neurons ranked by the first-order screen (``sufficiency``, ``necessity``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from weightpatch.cli import common, summary
from weightpatch.config import TraceConfig, build_config
from weightpatch.errors import WeightPatchError
from weightpatch.results import ScoreTable
from weightpatch.rundir import RunDir
from weightpatch.runner import render_prompts


def carrier_targets(run: RunDir, table: ScoreTable, n: int = 3) -> list[str]:
    """Targets for supplier tracing: components whose activation carries the state (router or both)
    and that have upstream layers, strongest first; else the strongest activation-space heads
    above layer 0."""
    roles = run.load_table("roles")
    if roles is not None and len(roles):
        carriers = roles[roles["role"].isin(["router", "both"]) & (roles["layer"] > 0) & (roles["kind"] != "layer")]
        if len(carriers):
            return carriers.sort_values("activation", ascending=False, key=abs)["component"].head(n).tolist()
    upstream = ScoreTable(table.select("activation", "head").frame.query("layer > 0"))
    return upstream.top(n, by_abs=True).components()


def validation_stage(run: RunDir, scorer, table: ScoreTable, seed: int) -> None:
    """Sufficiency and necessity curves, top-k by the first-order screen vs random k, for three
    rankings of disjoint components: attention/MLP blocks, heads, neurons."""
    from weightpatch.validation import necessity_curve, sufficiency_curve

    first = table.select("first_order").frame
    blocks = first[(first["kind"] == "module") & first["component"].str.fullmatch(r"L\d+\.(attn|mlp)")]
    rankings = {
        "attention/MLP blocks": (ScoreTable(blocks), [1, 2, 4, 8]),
        "heads": (table.select("first_order", "head"), [1, 2, 4, 8]),
        "neurons": (table.select("first_order", "neuron"), [1, 4, 16, 64]),
    }
    for name, curve_of in (("sufficiency", sufficiency_curve), ("necessity", necessity_curve)):
        if run.has(name):
            continue
        curves = []
        with common.console.status(f"{name} curves (top-k vs random-k)"):
            for label, (ranked, ks) in rankings.items():
                ks = [k for k in ks if k <= len(ranked)]
                if ks:
                    curve = curve_of(scorer, ranked, ks=ks, method="first_order", controls=3, seed=seed)
                    curves.append(curve.assign(ranking=label))
        if curves:
            run.save_table(name, pd.concat(curves, ignore_index=True))


def run_trace(
    pair,
    run: RunDir,
    anchor,
    texts: list[str],
    *,
    batch_size: int,
    seed: int,
    progress: bool,
    targets: list[str] | None = None,
    method: str = "first_order",
    n_targets: int = 3,
) -> None:
    """Activation-space scores, roles, supplier tracing and validation curves, each skipped when
    the run directory already has it. First-order scores of kinds the run lacks are computed first."""
    from weightpatch.roles import assign_roles
    from weightpatch.scoring import AnchorScorer
    from weightpatch.screening.first_order import gradient_scores
    from weightpatch.tracing import hierarchy, supplier_overlap, trace_suppliers

    scorer = AnchorScorer(pair, anchor, texts, batch_size)
    if not (run.scores().frame["method"] == "activation").any():
        from weightpatch.activation import activation_scores, default_components

        components = default_components(pair.space, kinds=("module", "head"))
        run.append_scores(activation_scores(scorer, components, progress=progress))
    have = set(run.scores().select("first_order").frame["kind"])
    missing = [kind for kind in ("layer", "module", "head", "neuron") if kind not in have]
    if missing:  # the rankings behind roles and curves need every kind screened
        run.append_scores(gradient_scores(scorer, kinds=missing, progress=progress))
    table = run.scores()
    if not run.has("roles"):
        weight_method = "exact" if (table.frame["method"] == "exact").any() else "first_order"
        run.save_table("roles", assign_roles(table, table, weight_method=weight_method))
    if not run.has("supplier_edges"):
        names = targets or carrier_targets(run, table, n_targets)
        if not names:
            raise WeightPatchError("no targets to trace: pass --targets (no component carries the state above layer 0)")
        with common.console.status(f"tracing suppliers of {', '.join(names)}"):
            verify = 5 if method == "first_order" else 0
            edges = trace_suppliers(scorer, names, kinds=("head", "neuron"), method=method, verify_top=verify)
        run.save_table("supplier_edges", edges)
    edges = run.load_table("supplier_edges")
    if not run.has("hierarchy"):
        levels = hierarchy(edges, pair.space, anchor.layer, run.load_table("roles"), k=5, min_supply=0.0)
        run.save_table("hierarchy", levels)
    if not run.has("supplier_overlap"):
        overlaps = [supplier_overlap(edges, table, k=k, method="first_order", kind="neuron") for k in (5, 10, 20)]
        run.save_table(
            "supplier_overlap",
            pd.DataFrame([{"k": o["k"], "fraction": o["fraction"], "shared": ",".join(o["shared"])} for o in overlaps]),
        )
    validation_stage(run, scorer, table, seed)


def trace(
    base: common.BaseArg,
    specialized: common.SpecArg,
    prompts: common.PromptsOpt = None,
    targets: Annotated[str | None, typer.Option(help="target components, e.g. L2.attn.head1,L2.attn.head3.")] = None,
    top_targets: Annotated[
        int | None, typer.Option(help="else: this many strongest carriers (router/both components).")
    ] = None,
    method: Annotated[str | None, typer.Option(help="first_order (with exact check of the top 3) or exact.")] = None,
    max_prompts: common.MaxPromptsOpt = None,
    config: common.ConfigOpt = None,
    device: common.DeviceOpt = None,
    dtype: common.DtypeOpt = None,
    batch_size: common.BatchOpt = None,
    seed: common.SeedOpt = None,
    run_dir: common.RunDirOpt = None,
    progress: common.ProgressOpt = None,
    debug: common.DebugOpt = False,
) -> None:
    """Activation-space scores, roles, supplier tracing and validation curves (needs an anchor in the run directory)."""
    cfg = build_config(
        TraceConfig,
        config,
        base=base,
        specialized=specialized,
        prompts=prompts,
        target_names=targets,
        targets=top_targets,
        method=method,
        max_prompts=max_prompts,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        seed=seed,
        run_dir=run_dir,
        progress=progress,
    )
    from weightpatch.anchors import Anchor

    root = common.run_dir_of(cfg)
    stem = Path(cfg.anchor).with_suffix("") if cfg.anchor else root / "anchor"
    if not stem.with_suffix(".json").is_file():
        raise WeightPatchError(f"no anchor at {stem}; build one with `wpatch anchor` (same --run-dir) or pass --anchor")
    records = common.read_prompt_file(cfg.prompts)[: cfg.max_prompts]
    pair = common.open_pair(cfg)
    names = [str(pair.space.parse(t)) for t in cfg.target_names or []]
    anchor = Anchor.load(stem, pair)
    with RunDir.open(root, "trace", cfg.identity(), pair.identities(), [cfg.base, cfg.specialized, cfg.prompts]) as run:
        texts = render_prompts(pair.tokenizer, [r.prompt for r in records], cfg.chat_template)
        run_trace(
            pair,
            run,
            anchor,
            texts,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            progress=cfg.progress,
            targets=names or None,
            method=cfg.method,
            n_targets=cfg.targets,
        )
        summary.print_summary(run)
        common.echo_path("run directory", Path(run.path))


def register(app: typer.Typer) -> None:
    app.command("trace")(common.handle_errors(trace))
