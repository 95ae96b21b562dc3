"""The merge stage: a baseline merge (task arithmetic, TIES, DARE) or a mechanism-aware one driven by
each expert's component scores (``scores``, one per expert: a ``scores.parquet``/``.csv`` or a run
directory holding one), streamed tensor by tensor into ``output``; optionally the equivalent
mergekit config (``mergekit_yaml``) and the merge evaluation table (``evaluate_prompts``: each
expert's anchor recovery, strict accuracy and KL to the expert for the base, each expert and the
merge). With ``run_dir`` a row describing the merge is added to ``merge_table`` (and the evaluation
saved as ``merge_evaluation``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from weightpatch.config import MergeStageConfig
from weightpatch.errors import WeightPatchError
from weightpatch.merging import (
    MergeConfig,
    component_space_for_checkpoint,
    merge_checkpoints,
    owner_takes_top,
    score_weighted,
    write_mergekit_yaml,
)
from weightpatch.pipeline.forecast import forecast
from weightpatch.pipeline.inputs import open_run, seed_everything


@dataclass
class MergeResult:
    output: Path
    row: dict[str, Any]  # the merge_table row: method, mechanism, experts, parameters touched, ...
    evaluation: pd.DataFrame | None  # long merge evaluation table (with evaluate_prompts)


def read_scores(path: Path, method: str) -> pd.DataFrame:
    """The ``component``/``score`` rows of one method from a score table file or a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "scores.parquet"
    if not path.is_file():
        raise WeightPatchError(f"score table {path} not found; run `wpatch screen` first or pass a scores file")
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # pyarrow/pandas raise many types for unreadable files
        raise WeightPatchError(f"cannot read score table {path}: {exc}") from None
    if "method" in frame.columns:
        methods = sorted(set(frame["method"]))
        if method not in methods:
            raise WeightPatchError(f"{path} has no {method!r} scores (it has {methods}); choose --score-method")
        frame = frame[frame["method"] == method]
    return frame[["component", "score"]]


def _of_kinds(space, table: pd.DataFrame, kinds: list[str], path: Path) -> pd.DataFrame:
    """The rows of ``table`` whose component is of one of ``kinds`` (``module``, ``head``, ...)."""
    keep = table[[space.parse(str(c)).kind in kinds for c in table["component"]]]
    if keep.empty:
        raise WeightPatchError(f"score table {path} has no {'/'.join(kinds)} scores; widen --score-kinds")
    return keep


def merger_of(cfg: MergeStageConfig):
    """The merge method of ``cfg``: a standard ``MergeConfig``, or a mechanism-aware merger over it."""
    standard = MergeConfig(
        method=cfg.method,
        weights=tuple(cfg.weights) if cfg.weights else None,
        lam=cfg.lam,
        density=cfg.density,
        drop_rate=cfg.drop_rate,
        seed=cfg.seed,
    )
    if cfg.mechanism == "none":
        return standard
    if len(cfg.scores) != len(cfg.experts):
        raise WeightPatchError(
            f"--mechanism {cfg.mechanism} needs one --scores per expert ({len(cfg.experts)} experts, "
            f"{len(cfg.scores)} score tables)"
        )
    space = component_space_for_checkpoint(cfg.base)
    tables = [read_scores(p, cfg.score_method) for p in cfg.scores]
    if cfg.score_kinds:
        tables = [_of_kinds(space, t, cfg.score_kinds, p) for t, p in zip(tables, cfg.scores, strict=True)]
    if cfg.mechanism == "owner_takes_top":
        return owner_takes_top(
            space, tables, top_k=cfg.top_k, threshold=cfg.threshold, standard=standard,
            conflict=cfg.conflict, others=cfg.others, rest=cfg.rest,
        )  # fmt: skip
    return score_weighted(space, tables, top_k=cfg.top_k, threshold=cfg.threshold, standard=standard)


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
        report = write_mergekit_yaml(cfg.mergekit_yaml, merger, cfg.base, cfg.experts)
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
