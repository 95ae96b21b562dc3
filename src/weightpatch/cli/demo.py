"""``wpatch demo``: the whole pipeline on the embedded model pair, ending with the HTML report.

Stages (each resumable in the run directory): load the pair; anchor layer search with the
instruction method on paired prompts (with / without the format instruction); steering check
(checker accuracy of short greedy generations of the base with the anchor added); screen-then-verify
on heads, modules and neurons (first order for all, exact for the top-k of each kind);
then ``wpatch trace``'s stages (activation-space scores, roles, supplier tracing of the carriers,
sufficiency/necessity curves); the report. ``--base``/``--specialized``/``--prompts``/``--heldout``
replace the shipped pair and prompts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from weightpatch.cli import common, summary
from weightpatch.cli.anchor import run_anchor
from weightpatch.cli.screen import run_screen
from weightpatch.cli.trace import run_trace
from weightpatch.config import AnchorConfig, DemoConfig, ScreenConfig, build_config
from weightpatch.rundir import RunDir
from weightpatch.runner import render_prompts

logger = logging.getLogger("weightpatch")


def demo(
    run_dir: common.RunDirOpt = None,
    top_k: Annotated[int | None, typer.Option(help="components per kind verified exactly.")] = None,
    kinds: Annotated[str | None, typer.Option(help="granularities screened.")] = None,
    anchor_prompts: Annotated[int | None, typer.Option(help="prompts per set for the anchor search.")] = None,
    screen_prompts: Annotated[int | None, typer.Option(help="prompts scored when screening.")] = None,
    steering_prompts: Annotated[int | None, typer.Option(help="prompts generated per steering alpha.")] = None,
    base: Annotated[str | None, typer.Option(help="replace the shipped base model.")] = None,
    specialized: Annotated[str | None, typer.Option(help="replace the shipped specialized model.")] = None,
    prompts: Annotated[Path | None, typer.Option(help="replace the shipped anchor prompts.")] = None,
    heldout: Annotated[Path | None, typer.Option(help="replace the shipped held-out prompts.")] = None,
    config: common.ConfigOpt = None,
    device: common.DeviceOpt = None,
    dtype: common.DtypeOpt = None,
    batch_size: common.BatchOpt = None,
    seed: common.SeedOpt = None,
    progress: common.ProgressOpt = None,
    debug: common.DebugOpt = False,
) -> None:
    """Run the whole pipeline on the embedded model pair and write the report."""
    start = time.perf_counter()
    import torch

    if base is None and specialized is None:
        torch.set_num_threads(1)  # the embedded pair is tiny: one thread is fastest, and robust to a busy machine
    cfg = build_config(
        DemoConfig,
        config,
        run_dir=run_dir,
        top_k=top_k,
        kinds=kinds,
        anchor_prompts=anchor_prompts,
        screen_prompts=screen_prompts,
        steering_prompts=steering_prompts,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    from weightpatch import demo as shipped

    if base is None or specialized is None:
        paths = shipped.paths()
        base, specialized = base or str(paths.base), specialized or str(paths.specialized)
    prompts = prompts or shipped.prompt_path("anchor")
    heldout = heldout or shipped.prompt_path("heldout")
    shared = {k: getattr(cfg, k) for k in ("device", "dtype", "batch_size", "seed", "run_dir", "progress")}
    acfg = AnchorConfig(
        base=base,
        specialized=specialized,
        prompts=prompts,
        heldout=heldout,
        max_prompts=cfg.anchor_prompts,
        method="instruction",
        alphas=cfg.alphas,
        steering_prompts=cfg.steering_prompts,
        max_new_tokens=cfg.max_new_tokens,
        **shared,
    )
    scfg = ScreenConfig(
        base=base,
        specialized=specialized,
        prompts=heldout,
        method="verify",
        kinds=cfg.kinds,
        top_k=cfg.top_k,
        **shared,
    )
    train, held = common.load_prompt_sets(acfg, cfg.seed)
    pair = common.open_pair(acfg)
    identity = {**cfg.identity(), "base": base, "specialized": specialized, "prompts": str(prompts)}
    inputs = [base, specialized, prompts, heldout]
    with RunDir.open(common.run_dir_of(cfg), "demo", identity, pair.identities(), inputs) as run:
        timings = {}
        t = time.perf_counter()
        anchor = run_anchor(acfg, pair, run, train, held)
        timings["anchor"] = time.perf_counter() - t
        common.out.print(f"anchor: layer {anchor.layer}, held-out AUC {anchor.metrics.get('auc', float('nan')):.3f}")
        records = [r for r in common.read_prompt_file(heldout) if r.instruction_id_list]
        import random

        random.Random(cfg.seed + 1).shuffle(records)
        texts = render_prompts(pair.tokenizer, [r.prompt for r in records[: cfg.screen_prompts]], None)
        t = time.perf_counter()
        table = run_screen(scfg, pair, run, anchor, texts)
        timings["screen"] = time.perf_counter() - t
        t = time.perf_counter()
        run_trace(pair, run, anchor, texts, batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress)
        timings["activation_roles_tracing_validation"] = time.perf_counter() - t
        from weightpatch.report import build_report

        t = time.perf_counter()
        path = build_report(run.path)
        timings["report"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        run.update_record(demo_timings_seconds={k: round(v, 1) for k, v in timings.items()})
        logger.info("demo timings: %s", timings)
        summary.print_summary(run, table)
        common.out.print(f"done in {timings['total']:.0f} s")
        common.echo_path("report", path.resolve())


def register(app: typer.Typer) -> None:
    app.command("demo")(common.handle_errors(demo))
