"""The merge stage: a baseline merge (task arithmetic, TIES, DARE) or a mechanism-aware one driven by
each expert's component scores (``scores``, one per expert: a ``scores.parquet``/``.csv`` or a run
directory holding one), streamed tensor by tensor into ``output``; optionally the equivalent
mergekit config (``mergekit_yaml``) and the merge evaluation table (``evaluate_prompts``: each
expert's anchor recovery, strict accuracy and KL to the expert for the base, each expert and the
merge). With ``run_dir`` a row describing the merge is added to ``merge_table`` (and the evaluation
saved as ``merge_evaluation``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from weightpatch.config import MergeStageConfig
from weightpatch.errors import WeightPatchError
from weightpatch.merging import (
    MergeConfig,
    component_space_for_checkpoint,
    merge_checkpoints,
    owner_takes_top,
    protect_then_add,
    score_weighted,
    stitch,
    write_mergekit_yaml,
)
from weightpatch.merging.registry import default
from weightpatch.pipeline.forecast import forecast
from weightpatch.pipeline.inputs import open_run, seed_everything
from weightpatch.runs import load_run


@dataclass
class MergeResult:
    output: Path
    row: dict[str, Any]  # the merge_table row: method, mechanism, experts, parameters touched, ...
    evaluation: pd.DataFrame | None  # long merge evaluation table (with evaluate_prompts)


def read_scores(path: Path, method: str) -> pd.DataFrame:
    """The ``component``/``score`` rows of one method from a score table file or a run directory."""
    path = Path(path)
    if path.is_dir():  # a run directory: its scores as the one reader sees them (pending rows included)
        frame = load_run(path).table("scores")
        if frame is None:
            raise WeightPatchError(f"run directory {path} has no scores; run `wpatch screen` there first")
    elif not path.is_file():
        raise WeightPatchError(f"score table {path} not found; run `wpatch screen` first or pass a scores file")
    else:
        try:
            frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        except Exception as exc:  # pyarrow/pandas raise many types for unreadable files
            raise WeightPatchError(f"cannot read score table {path}: {exc}") from None
    if "method" in frame.columns:
        methods = sorted(set(frame["method"]))
        if method not in methods:
            raise WeightPatchError(f"{path} has no {method!r} scores (it has {methods}); choose --score-method")
        frame = frame[frame["method"] == method]
    scores = pd.to_numeric(frame["score"], errors="coerce")
    bad = frame.loc[~np.isfinite(scores.to_numpy(dtype=float)), "component"]
    if len(bad):
        listed = ", ".join(map(str, bad[:3])) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise WeightPatchError(
            f"score table {path} holds NaN/inf (or non-numeric) {method} scores for {listed}; re-run `wpatch screen` "
            f"for those components, or drop their rows"
        )
    return frame[["component", "score"]]


def _of_kinds(space, table: pd.DataFrame, kinds: Sequence[str], path: Path) -> pd.DataFrame:
    """The rows of ``table`` whose component is of one of ``kinds`` (``module``, ``head``, ...)."""
    keep = table[[space.parse(str(c)).kind in kinds for c in table["component"]]]
    if keep.empty:
        raise WeightPatchError(f"score table {path} has no {'/'.join(kinds)} scores; widen --score-kinds")
    return keep


def _texts(path: Path, tokenizer) -> list[str]:
    """The model-ready texts of a JSONL file of ``{"prompt": ..., "response": ...}`` records (the
    response is optional): the rendered prompt followed by the response."""
    import json

    from weightpatch.runner import render_prompt

    path = Path(path)
    if not path.is_file():
        raise WeightPatchError(f"--snip-data file {path} not found")
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            texts.append(render_prompt(tokenizer, str(record["prompt"])) + str(record.get("response", "")))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WeightPatchError(f"{path}:{lineno}: expected a JSON object with a 'prompt' field") from None
    return texts


def _expert_revisions(cfg: MergeStageConfig) -> list[str | None]:
    """The hub revision of each expert (None: the default branch, or a directory)."""
    return list(cfg.expert_revisions) if cfg.expert_revisions else [None] * len(cfg.experts)


def score_tables(cfg: MergeStageConfig, space) -> list[Any]:
    """One component score table per expert from ``cfg.score_source`` (``protect_then_add``: only
    the protected expert's is computed, the others are empty)."""
    from weightpatch.merging import scores
    from weightpatch.merging.stream import open_checkpoint

    n = len(cfg.experts)
    wanted = [cfg.protect == i if cfg.mechanism == "protect_then_add" else True for i in range(n)]
    kinds = cfg.score_kinds or scores.DEFAULT_KINDS
    if cfg.score_source == "weight_patching":
        if len(cfg.scores) != n:
            raise WeightPatchError(
                f"--mechanism {cfg.mechanism} needs one --scores per expert ({n} experts, "
                f"{len(cfg.scores)} score tables)"
            )
        tables = [read_scores(p, cfg.score_method) for p in cfg.scores]
        if cfg.score_kinds:
            tables = [_of_kinds(space, t, cfg.score_kinds, p) for t, p in zip(tables, cfg.scores, strict=True)]
        return [t if w else {} for t, w in zip(tables, wanted, strict=True)]
    if cfg.score_source == "random":
        return [scores.random_scores(space, f"{cfg.seed}:{i}", kinds) if wanted[i] else {} for i in range(n)]
    if cfg.score_source == "magnitude":
        base = open_checkpoint(cfg.base, cfg.base_revision)
        revisions = _expert_revisions(cfg)
        return [
            scores.magnitude_scores(space, base, open_checkpoint(e, r, base=base), kinds) if w else {}
            for e, r, w in zip(cfg.experts, revisions, wanted, strict=True)
        ]
    if len(cfg.snip_data) != n:
        raise WeightPatchError(f"--score-source snip needs one --snip-data file per expert ({n} experts)")
    from weightpatch.loading import load_model

    tables = []
    revisions = _expert_revisions(cfg)
    for expert, revision, data, w in zip(cfg.experts, revisions, cfg.snip_data, wanted, strict=True):
        if not w:
            tables.append({})
            continue
        model, tokenizer = load_model(
            expert, revision=revision, base=cfg.base, trust_remote_code=cfg.trust_remote_code, frozen=False
        )
        tables.append(scores.snip_scores(space, model, tokenizer, _texts(data, tokenizer), kinds))
        del model
    return tables


def merger_of(cfg: MergeStageConfig):
    """The merge method of ``cfg``: a standard ``MergeConfig``, or a mechanism-aware rule over it
    with component scores from ``cfg.score_source``. Unset selection and conflict options take the
    rule's registered defaults (:mod:`weightpatch.merging.registry`)."""
    standard = MergeConfig(
        method=cfg.method,
        weights=tuple(cfg.weights) if cfg.weights else None,
        lam=cfg.lam,
        density=cfg.density,
        drop_rate=cfg.drop_rate,
        seed=cfg.seed,
        tall_lambda=cfg.tall_lambda,
        min_agree=cfg.min_agree,
        layer_owners=tuple(cfg.layer_owners) if cfg.layer_owners else None,
    )
    if cfg.mechanism == "none":
        return standard
    space = component_space_for_checkpoint(cfg.base, revision=cfg.base_revision)
    tables = score_tables(cfg, space)
    chosen = cfg.top_k is not None or cfg.fraction is not None or cfg.threshold is not None
    conflict = cfg.conflict or default(cfg.mechanism, "conflict", "max")
    selection = {"top_k": cfg.top_k, "fraction": cfg.fraction, "threshold": cfg.threshold}
    if cfg.mechanism == "owner_takes_top":
        top_k = cfg.top_k if chosen else default("owner_takes_top", "top_k")
        return owner_takes_top(
            space, tables, **{**selection, "top_k": top_k}, standard=standard, strength=cfg.strength,
            conflict=conflict, others=cfg.others, rest=cfg.rest,
        )  # fmt: skip
    if cfg.mechanism == "protect_then_add":
        return protect_then_add(
            space, tables, protect=cfg.protect, **selection, standard=standard, strength=cfg.strength, others=cfg.others
        )
    if cfg.mechanism == "stitch":
        return stitch(space, tables, **selection, strength=cfg.strength, conflict=conflict)
    return score_weighted(space, tables, **selection, standard=standard, floor=cfg.floor)


def evaluate_merge(base: str, experts: list[str], merged: Path, prompt_files: list[Path]) -> pd.DataFrame:
    """The merge evaluation table: one capability per expert from its prompt file (anchor at the last
    layer; instruction vectors when every record has ``prompt_without_instruction``)."""
    from weightpatch.merging.evaluate import build_capability, evaluate_models
    from weightpatch.prompts import load_prompts

    caps = []
    for i, (expert, path) in enumerate(zip(experts, prompt_files, strict=True)):
        records = load_prompts(path)
        without = [r.prompt_without_instruction for r in records]
        name = f"{i}:{Path(expert).name}"
        caps.append(
            build_capability(
                name, base, expert, [r.prompt for r in records], None if None in without else without, records=records
            )
        )
    models = {"base": base, **{f"expert:{c.name}": c.expert for c in caps}, "merged": merged}
    return evaluate_models(caps, models)


def run_merge(cfg: MergeStageConfig) -> MergeResult:
    """Merge ``cfg.experts`` into ``cfg.base`` (and evaluate, export, record as configured)."""
    seed_everything(cfg.seed)
    forecast("merge", cfg)
    if cfg.evaluate_prompts and len(cfg.evaluate_prompts) != len(cfg.experts):
        raise WeightPatchError(
            f"--evaluate-prompts needs one prompt file per expert ({len(cfg.experts)} experts, "
            f"{len(cfg.evaluate_prompts)} files)"
        )
    merger = merger_of(cfg)
    bar = tqdm(desc="merge", unit="tensor", disable=not cfg.progress)

    def progress(done: int, total: int, _name: str) -> None:
        bar.total = total
        bar.update(done - bar.n)

    output = merge_checkpoints(
        cfg.base,
        cfg.experts,
        cfg.output,
        merger,
        overwrite=cfg.overwrite,
        progress=progress,
        base_revision=cfg.base_revision,
        expert_revisions=cfg.expert_revisions,
        trust_remote_code=cfg.trust_remote_code,
        out_dtype=getattr(torch, cfg.dtype) if cfg.dtype else None,
        max_shard_size=cfg.max_shard_size,
    )
    bar.close()
    mechanism = cfg.mechanism != "none"
    row: dict[str, Any] = {
        "output": str(output),
        "method": cfg.method,
        "mechanism": cfg.mechanism,
        "experts": ", ".join(cfg.experts),
        "top_k": cfg.top_k if mechanism else None,
        "parameters_touched": len(merger.parameters_touched()) if mechanism else None,
    }
    if cfg.mergekit_yaml is not None:
        report = write_mergekit_yaml(cfg.mergekit_yaml, merger, cfg.base, cfg.experts, out_dtype=cfg.dtype)
        row["mergekit_exact"] = bool(report.exact)
    evaluation = None
    if cfg.evaluate_prompts:
        evaluation = evaluate_merge(cfg.base, list(cfg.experts), output, list(cfg.evaluate_prompts))
    if cfg.run_dir is not None:
        with open_run(cfg, f"merge:{output.name}", None, [cfg.base, *cfg.experts]) as run:
            previous = run.load_table("merge_table")
            frame = pd.DataFrame([row])
            if previous is not None:
                frame = pd.concat([previous[previous["output"] != row["output"]], frame], ignore_index=True)
            run.save_table("merge_table", frame)
            if evaluation is not None:
                run.save_table("merge_evaluation", evaluation)
    return MergeResult(output, row, evaluation)
