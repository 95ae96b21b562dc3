"""The anchor stage: build the vector anchor (layer search or a fixed layer), validate it on held-out
prompts and with a steering check, and save it into the run directory (method: docs/method.md,
"Anchor").

Writes ``anchor.safetensors``/``anchor.json``, ``anchor_layers`` (held-out separation per layer:
Cohen's d, AUC, accuracy) and ``steering`` (behavioural metric of the base model with ``alpha``
anchor gaps added along the anchor at its layer). Resumes: a finished anchor or steering curve in the
run directory is reused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from weightpatch.anchors import Anchor, search_anchor_layer, steering_curve
from weightpatch.config import AnchorConfig
from weightpatch.errors import WeightPatchError
from weightpatch.pair import ModelPair
from weightpatch.pipeline.forecast import forecast
from weightpatch.pipeline.inputs import anchor_prompt_sets, open_run, pair_for, render
from weightpatch.prompts import PromptRecord, without_instruction
from weightpatch.rundir import RunDir

logger = logging.getLogger("weightpatch")


@dataclass
class AnchorResult:
    anchor: Anchor
    layer_search: pd.DataFrame  # one row per searched layer: cohen_d, auc, accuracy, ...
    steering: pd.DataFrame | None  # alpha, metric (None: no prompt with instructions)
    run_dir: Path


def steering_metric(pair: ModelPair, records: list[PromptRecord], cfg: AnchorConfig) -> Callable[..., float]:
    """Prompt-level (loose) instruction-following accuracy of short greedy generations (``cfg.checker``)."""
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
            prompt_format=cfg.prompt_format,
        )
        accuracy, _ = evaluate(records, responses, checker=cfg.checker)
        return accuracy.prompt_loose

    return metric


def check_layers(cfg: AnchorConfig, num_layers: int) -> list[int] | None:
    """The layers to search (None: the default range), each checked to exist."""
    layers = [cfg.layer] if cfg.layer is not None else cfg.layers
    for layer in layers or []:
        if not 0 <= layer < num_layers:
            raise WeightPatchError(f"anchor layer {layer} is out of range (the model has layers 0..{num_layers - 1})")
    return layers


def _build(cfg: AnchorConfig, pair: ModelPair, run: RunDir, train: list, heldout: list) -> Anchor:
    layers = check_layers(cfg, pair.space.num_layers)
    saved = all(run.anchor_stem.with_suffix(suffix).is_file() for suffix in (".json", ".safetensors"))
    if saved and run.has("anchor_layers"):  # a missing anchor file is rebuilt
        anchor = Anchor.load(run.anchor_stem, pair)
        logger.info("reusing the anchor in %s (layer %d)", run.path, anchor.layer)
        return anchor
    if cfg.method == "instruction":
        without_train = render(pair, [r.prompt for r in without_instruction(train)], cfg)
        without_held = render(pair, [r.prompt for r in without_instruction(heldout)], cfg)
    else:
        without_train = without_held = None
    logger.info("anchor layer search (%s, %d+%d prompts)", cfg.method, len(train), len(heldout))
    anchor, table = search_anchor_layer(
        pair,
        render(pair, [r.prompt for r in train], cfg),
        without_train,
        render(pair, [r.prompt for r in heldout], cfg),
        without_held,
        method=cfg.method,
        layers=layers,
        batch_size=cfg.batch_size,
        truncate_prompts=cfg.truncate_prompts,
    )
    anchor.save(run.anchor_stem)
    run.save_table("anchor_layers", table)
    logger.info("anchor at layer %d: %s", anchor.layer, anchor.metrics)
    return anchor


def _steering(cfg: AnchorConfig, pair: ModelPair, run: RunDir, anchor: Anchor, heldout: list) -> None:
    records = [r for r in heldout if r.instruction_id_list][: cfg.steering_prompts]
    if run.has("steering") or not cfg.alphas or not cfg.steering_prompts:
        return
    if not records:
        logger.info("no prompts with instruction ids: steering check skipped")
        return
    scale = float(anchor.metrics.get("mean_gap", 1.0)) or 1.0
    metric = steering_metric(pair, records, cfg)
    nonzero = sum(1 for a in cfg.alphas if a != 0)
    total = len(cfg.alphas) + cfg.steering_random_directions * nonzero + 2  # anchor, random controls, references
    bar = tqdm(total=total, desc="steering", unit="run", disable=not cfg.progress)

    def counted(model) -> float:
        value = metric(model)
        bar.update(1)
        return value

    curve = steering_curve(
        pair,
        anchor,
        cfg.alphas,
        counted,
        scale=scale,
        random_directions=cfg.steering_random_directions,
        seed=cfg.seed,
        references=True,
    )
    bar.close()
    curve["metric_name"] = "prompt-level instruction accuracy (loose)"
    curve["scale"] = scale
    curve["n_prompts"] = len(records)
    run.save_table("steering", curve)


def run_anchor(cfg: AnchorConfig, pair: ModelPair | None = None) -> AnchorResult:
    """Search/build the anchor (reusing one already in the run directory) and its steering curve."""
    train, heldout = anchor_prompt_sets(cfg)
    forecast("anchor", cfg, pair)
    pair = pair_for(cfg, pair)
    check_layers(cfg, pair.space.num_layers)
    with open_run(cfg, "anchor", pair, [cfg.base, cfg.specialized, cfg.prompts, cfg.heldout]) as run:
        anchor = _build(cfg, pair, run, train, heldout)
        _steering(cfg, pair, run, anchor, heldout)
        return AnchorResult(anchor, run.load_table("anchor_layers"), run.load_table("steering"), run.path)
