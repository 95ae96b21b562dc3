"""``wpatch merge BASE EXPERT...``: flags -> :class:`~weightpatch.config.MergeStageConfig` ->
:func:`~weightpatch.pipeline.run_merge`."""

from __future__ import annotations

import typer

from weightpatch.cli import common
from weightpatch.cli.options import add_command
from weightpatch.config import MergeStageConfig


def show(cfg: MergeStageConfig) -> None:
    from weightpatch.pipeline import run_merge

    result = run_merge(cfg.model_copy(update={"progress": common.progress_wanted(cfg.progress)}))
    common.echo_path("merged model", result.output)
    if cfg.mergekit_yaml is not None:
        common.echo_path("mergekit config", cfg.mergekit_yaml)
    if result.evaluation is not None:
        from weightpatch.merging.evaluate import wide_table

        typer.echo(wide_table(result.evaluation).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def register(app: typer.Typer) -> None:
    add_command(
        app,
        "merge",
        MergeStageConfig,
        show,
        arguments=("base", "experts"),
        short={"output": "-o"},
        help="Merge experts into BASE: a baseline, or mechanism-aware from component scores.",
    )
