"""``wpatch merge BASE EXPERT... --output DIR``: a baseline merge (task arithmetic, TIES, DARE) or a
mechanism-aware one driven by each expert's component scores (``--scores``, one per expert: a
``scores.parquet``/``.csv`` or a run directory holding one). ``--mergekit-yaml`` also writes the
equivalent mergekit config. With ``--run-dir`` a row describing the merge is appended to
``merge_table.parquet``. ``--evaluate-prompts`` (an IFEval JSONL file per expert) adds the merge
evaluation table (:mod:`weightpatch.merging.evaluate`): each expert's anchor recovery, strict accuracy and
KL to the expert for the base, each expert and the merge (saved as ``merge_evaluation`` with ``--run-dir``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from weightpatch.cli import common
from weightpatch.config import MergeCommandConfig, build_config
from weightpatch.errors import WeightPatchError
from weightpatch.rundir import RunDir


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


def run_merge(cfg: MergeCommandConfig) -> tuple[Path, dict]:
    from tqdm.auto import tqdm

    from weightpatch.merging import (
        MergeConfig,
        component_space_for_checkpoint,
        merge_checkpoints,
        owner_takes_top,
        score_weighted,
        write_mergekit_yaml,
    )

    standard = MergeConfig(
        method=cfg.method,
        weights=tuple(cfg.weights) if cfg.weights else None,
        lam=cfg.lam,
        density=cfg.density,
        drop_rate=cfg.drop_rate,
        seed=cfg.seed,
    )
    merger = standard
    if cfg.mechanism != "none":
        if len(cfg.scores) != len(cfg.experts):
            raise WeightPatchError(
                f"--mechanism {cfg.mechanism} needs one --scores per expert ({len(cfg.experts)} experts, "
                f"{len(cfg.scores)} score tables)"
            )
        space = component_space_for_checkpoint(cfg.base)
        tables = [read_scores(p, cfg.score_method) for p in cfg.scores]
        build = owner_takes_top if cfg.mechanism == "owner_takes_top" else score_weighted
        merger = build(space, tables, top_k=cfg.top_k, threshold=cfg.threshold, standard=standard)
    bar = tqdm(desc="merge", unit="tensor", disable=not cfg.progress)

    def progress(done: int, total: int, _name: str) -> None:
        bar.total = total
        bar.update(done - bar.n)

    output = merge_checkpoints(cfg.base, cfg.experts, cfg.output, merger, overwrite=cfg.overwrite, progress=progress)
    bar.close()
    row = {
        "output": str(output),
        "method": cfg.method,
        "mechanism": cfg.mechanism,
        "experts": ", ".join(cfg.experts),
        "top_k": cfg.top_k if cfg.mechanism != "none" else None,
        "parameters_touched": len(merger.parameters_touched()) if cfg.mechanism != "none" else None,
    }
    if cfg.mergekit_yaml is not None:
        report = write_mergekit_yaml(cfg.mergekit_yaml, merger, cfg.base, cfg.experts)
        row["mergekit_exact"] = bool(report.exact)
    return output, row


def evaluate_merge(base: str, experts: list[str], merged: Path, prompt_files: list[Path]) -> pd.DataFrame:
    """The merge evaluation table: one capability per expert from its prompt file (anchor at the last
    layer; instruction vectors when every record has ``prompt_without_instruction``)."""
    from weightpatch.merging.evaluate import build_capability, evaluate_models
    from weightpatch.prompts import load_prompts

    if len(prompt_files) != len(experts):
        raise WeightPatchError(
            f"--evaluate-prompts needs one prompt file per expert ({len(experts)} experts, {len(prompt_files)} files)"
        )
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


def merge(
    base: common.BaseArg,
    experts: Annotated[list[str], typer.Argument(help="expert models fine-tuned from BASE (directories).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="directory for the merged model.")] = None,
    method: Annotated[str | None, typer.Option(help="task_arithmetic, ties, dare_linear or dare_ties.")] = None,
    mechanism: Annotated[str | None, typer.Option(help="none, owner_takes_top or score_weighted.")] = None,
    scores: Annotated[list[Path] | None, typer.Option(help="score table or run dir, once per expert.")] = None,
    score_method: Annotated[str | None, typer.Option(help="which scores to use [default: exact].")] = None,
    top_k: Annotated[int | None, typer.Option(help="components each expert owns (mechanism-aware).")] = None,
    threshold: Annotated[float | None, typer.Option(help="minimum score of an owned component.")] = None,
    weights: Annotated[str | None, typer.Option(help="per-expert weights, e.g. 1,0.5.")] = None,
    lam: Annotated[float | None, typer.Option(help="task-arithmetic scaling lambda.")] = None,
    density: Annotated[float | None, typer.Option(help="TIES keep fraction.")] = None,
    drop_rate: Annotated[float | None, typer.Option(help="DARE drop probability.")] = None,
    mergekit_yaml: Annotated[Path | None, typer.Option(help="also write the mergekit config here.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite/--no-overwrite", help="replace --output.")] = None,
    evaluate_prompts: Annotated[
        list[Path] | None, typer.Option(help="IFEval JSONL prompts, once per expert: add the evaluation table.")
    ] = None,
    config: common.ConfigOpt = None,
    device: common.DeviceOpt = None,
    dtype: common.DtypeOpt = None,
    seed: common.SeedOpt = None,
    run_dir: common.RunDirOpt = None,
    progress: common.ProgressOpt = None,
    debug: common.DebugOpt = False,
) -> None:
    """Merge experts into BASE: a baseline, or mechanism-aware from component scores."""
    cfg = build_config(
        MergeCommandConfig,
        config,
        base=base,
        experts=experts or None,
        output=output,
        method=method,
        mechanism=mechanism,
        scores=scores or None,
        score_method=score_method,
        top_k=top_k,
        threshold=threshold,
        weights=weights,
        lam=lam,
        density=density,
        drop_rate=drop_rate,
        mergekit_yaml=mergekit_yaml,
        overwrite=overwrite,
        device=device,
        dtype=dtype,
        seed=seed,
        run_dir=run_dir,
        progress=progress,
    )
    common.seed_everything(cfg.seed)
    path, row = run_merge(cfg)
    common.echo_path("merged model", path)
    if cfg.mergekit_yaml is not None:
        common.echo_path("mergekit config", cfg.mergekit_yaml)
    evaluation = None
    if evaluate_prompts:
        from weightpatch.merging.evaluate import wide_table

        evaluation = evaluate_merge(cfg.base, list(cfg.experts), path, list(evaluate_prompts))
        typer.echo(wide_table(evaluation).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if cfg.run_dir is not None:
        with RunDir.open(cfg.run_dir, f"merge:{path.name}", cfg.identity(), None, [cfg.base, *cfg.experts]) as run:
            previous = run.load_table("merge_table")
            frame = pd.DataFrame([row])
            if previous is not None:
                frame = pd.concat([previous[previous["output"] != row["output"]], frame], ignore_index=True)
            run.save_table("merge_table", frame)
            if evaluation is not None:
                run.save_table("merge_evaluation", evaluation)


def register(app: typer.Typer) -> None:
    app.command("merge")(common.handle_errors(merge))
