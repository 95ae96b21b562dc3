"""``wpatch anchor``: build the vector anchor (layer search or a fixed layer), validate it on held-out
prompts and with a steering check, and save it into the run directory.

Writes ``anchor.safetensors``/``anchor.json``, ``anchor_layers.parquet`` (held-out separation per
layer: Cohen's d, AUC, accuracy) and ``steering.parquet`` (behavioural metric of the base model
with ``alpha`` anchor gaps added along the anchor at its layer). Resumes: a finished anchor or
steering curve in the run directory is reused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from weightpatch.cli import common
from weightpatch.config import AnchorConfig, build_config
from weightpatch.errors import WeightPatchError
from weightpatch.rundir import RunDir
from weightpatch.runner import render_prompts

logger = logging.getLogger("weightpatch")


def steering_metric(pair, records, cfg: AnchorConfig):
    """Prompt-level (loose) instruction-following accuracy of short greedy generations."""
    from weightpatch.checkers import evaluate
    from weightpatch.generation import generate

    prompts = [r.prompt for r in records]

    def metric(model) -> float:
        responses = generate(
            model,
            pair.tokenizer,
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            use_chat_template=cfg.chat_template,
        )
        accuracy, _ = evaluate(records, responses)
        return accuracy.prompt_loose

    return metric


def check_layers(cfg: AnchorConfig, pair) -> list[int] | None:
    """The layers to search (None: the default range), each checked to exist."""
    n = pair.space.num_layers
    layers = [cfg.layer] if cfg.layer is not None else cfg.layers
    for layer in layers or []:
        if not 0 <= layer < n:
            raise WeightPatchError(f"anchor layer {layer} is out of range (the model has layers 0..{n - 1})")
    return layers


def run_anchor(cfg: AnchorConfig, pair, run: RunDir, train: list, heldout: list):
    """Search/build the anchor (reusing one already in the run directory) and its steering curve."""
    from tqdm.auto import tqdm

    from weightpatch.anchors import Anchor, search_anchor_layer, steering_curve

    layers = check_layers(cfg, pair)
    if run.anchor_stem.with_suffix(".json").is_file() and run.has("anchor_layers"):
        anchor = Anchor.load(run.anchor_stem, pair)
        logger.info("reusing the anchor in %s (layer %d)", run.path, anchor.layer)
    else:
        instruction = cfg.method == "instruction"
        if instruction:
            from weightpatch.prompts import without_instruction

            without_train = render_prompts(
                pair.tokenizer, [r.prompt for r in without_instruction(train)], cfg.chat_template
            )
            without_held = render_prompts(
                pair.tokenizer, [r.prompt for r in without_instruction(heldout)], cfg.chat_template
            )
        else:
            without_train = without_held = None
        with common.console.status(f"anchor layer search ({cfg.method}, {len(train)}+{len(heldout)} prompts)"):
            anchor, table = search_anchor_layer(
                pair,
                render_prompts(pair.tokenizer, [r.prompt for r in train], cfg.chat_template),
                without_train,
                render_prompts(pair.tokenizer, [r.prompt for r in heldout], cfg.chat_template),
                without_held,
                method=cfg.method,
                layers=layers,
                batch_size=cfg.batch_size,
            )
        anchor.save(run.anchor_stem)
        run.save_table("anchor_layers", table)
        logger.info("anchor at layer %d: %s", anchor.layer, anchor.metrics)
    steer_records = [r for r in heldout if r.instruction_id_list][: cfg.steering_prompts]
    if not run.has("steering") and steer_records and cfg.alphas:
        scale = float(anchor.metrics.get("mean_gap", 1.0)) or 1.0
        metric = steering_metric(pair, steer_records, cfg)
        bar = tqdm(total=len(cfg.alphas), desc="steering", unit="alpha", disable=not cfg.progress)

        def counted(model) -> float:
            value = metric(model)
            bar.update(1)
            return value

        curve = steering_curve(pair, anchor, cfg.alphas, counted, scale=scale)
        bar.close()
        curve["metric_name"] = "prompt-level instruction accuracy (loose)"
        curve["scale"] = scale
        curve["n_prompts"] = len(steer_records)
        run.save_table("steering", curve)
    elif not steer_records:
        logger.info("no prompts with instruction ids: steering check skipped")
    return anchor


def anchor(
    base: common.BaseArg,
    specialized: common.SpecArg,
    prompts: common.PromptsOpt = None,
    heldout: common.HeldoutOpt = None,
    method: Annotated[
        str | None, typer.Option(help="instruction (with vs without instruction) or model_diff (sft vs base).")
    ] = None,
    layer: Annotated[int | None, typer.Option(help="build at this layer (no search).")] = None,
    layers: Annotated[str | None, typer.Option(help="layers to search, e.g. 2,4,6 [default: n//5..n step 2].")] = None,
    alphas: Annotated[str | None, typer.Option(help="steering strengths in anchor gaps, e.g. 0,1,2.")] = None,
    steering_prompts: Annotated[int | None, typer.Option(help="prompts for the steering check (0: skip).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="tokens generated per steering prompt.")] = None,
    max_prompts: common.MaxPromptsOpt = None,
    config: common.ConfigOpt = None,
    device: common.DeviceOpt = None,
    dtype: common.DtypeOpt = None,
    batch_size: common.BatchOpt = None,
    seed: common.SeedOpt = None,
    run_dir: common.RunDirOpt = None,
    trust_remote_code: common.TrustOpt = None,
    progress: common.ProgressOpt = None,
    debug: common.DebugOpt = False,
) -> None:
    """Build and validate the vector anchor; save it (and the layer search, steering curve) in the run directory."""
    cfg = build_config(
        AnchorConfig,
        config,
        base=base,
        specialized=specialized,
        prompts=prompts,
        heldout=heldout,
        method=method,
        layer=layer,
        layers=layers,
        alphas=alphas,
        steering_prompts=steering_prompts,
        max_new_tokens=max_new_tokens,
        max_prompts=max_prompts,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        seed=seed,
        run_dir=run_dir,
        trust_remote_code=trust_remote_code,
        progress=progress,
    )
    train, held = common.load_prompt_sets(cfg, cfg.seed)
    pair = common.open_pair(cfg)
    check_layers(cfg, pair)
    inputs = [cfg.base, cfg.specialized, cfg.prompts, *([cfg.heldout] if cfg.heldout else [])]
    with RunDir.open(common.run_dir_of(cfg), "anchor", cfg.identity(), pair.identities(), inputs) as run:
        result = run_anchor(cfg, pair, run, train, held)
        m = result.metrics
        common.out.print(
            f"anchor: layer {result.layer} ({result.method}); held-out Cohen's d {m.get('cohen_d', float('nan')):.2f}, "
            f"AUC {m.get('auc', float('nan')):.3f}"
        )
        curve = run.load_table("steering")
        if curve is not None:
            common.out.print(
                "steering: "
                + ", ".join(f"alpha {a:g}: {v:.2f}" for a, v in zip(curve["alpha"], curve["metric"], strict=True))
            )
        common.echo_path("run directory", Path(run.path))


def register(app: typer.Typer) -> None:
    app.command("anchor")(common.handle_errors(anchor))
