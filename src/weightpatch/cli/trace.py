"""``wpatch trace``: supplier -> target tracing (SPEC section 7) over :mod:`weightpatch.tracing`.

Targets: ``--targets`` names, or the top ``--top-targets`` heads by activation-space score in the
run directory's ``scores.parquet``. Writes ``supplier_edges.parquet`` into the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weightpatch.cli import common
from weightpatch.config import TraceConfig, build_config
from weightpatch.errors import WeightPatchError
from weightpatch.rundir import RunDir
from weightpatch.runner import render_prompts


def trace(
    base: common.BaseArg,
    specialized: common.SpecArg,
    prompts: common.PromptsOpt = None,
    targets: Annotated[str | None, typer.Option(help="target components, e.g. L2.attn.head1,L2.attn.head3.")] = None,
    top_targets: Annotated[int | None, typer.Option(help="else: this many top activation-space heads.")] = None,
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
    """Trace which upstream components supply the target heads (needs an anchor in the run directory)."""
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
    from weightpatch.scoring import AnchorScorer
    from weightpatch.tracing import trace_suppliers

    root = common.run_dir_of(cfg)
    stem = Path(cfg.anchor).with_suffix("") if cfg.anchor else root / "anchor"
    if not stem.with_suffix(".json").is_file():
        raise WeightPatchError(f"no anchor at {stem}; build one with `wpatch anchor` (same --run-dir) or pass --anchor")
    records = common.read_prompt_file(cfg.prompts)[: cfg.max_prompts]
    pair = common.open_pair(cfg)
    names = [str(pair.space.parse(t)) for t in cfg.target_names or []]
    anchor = Anchor.load(stem, pair)
    with RunDir.open(root, "trace", cfg.identity(), pair.identities(), [cfg.base, cfg.specialized, cfg.prompts]) as run:
        if not names:
            names = run.scores().top(cfg.targets, method="activation", kind="head", by_abs=True).components()
        if not names:
            raise WeightPatchError("no targets: pass --targets, or compute activation-space head scores first")
        texts = render_prompts(pair.tokenizer, [r.prompt for r in records], cfg.chat_template)
        scorer = AnchorScorer(pair, anchor, texts, cfg.batch_size)
        verify = 3 if cfg.method == "first_order" else 0
        edges = trace_suppliers(scorer, names, method=cfg.method, verify_top=verify)  # type: ignore[arg-type]
        run.save_table("supplier_edges", edges)
        common.out.print(edges.groupby("target").head(3).to_string(index=False))
        common.echo_path("run directory", Path(run.path))


def register(app: typer.Typer) -> None:
    app.command("trace")(common.handle_errors(trace))
