"""``wpatch trace``: flags -> :class:`~weightpatch.config.TraceConfig` -> :func:`~weightpatch.pipeline.run_trace`."""

from __future__ import annotations

import typer

from weightpatch.cli import common
from weightpatch.cli.options import add_command
from weightpatch.config import TraceConfig


def show(cfg: TraceConfig) -> None:
    from weightpatch.cli import summary
    from weightpatch.pipeline import run_trace

    result = run_trace(cfg.model_copy(update={"progress": common.progress_wanted(cfg.progress)}))
    summary.print_summary(result.run_dir, result.scores)
    common.echo_path("run directory", result.run_dir)


def register(app: typer.Typer) -> None:
    add_command(
        app,
        "trace",
        TraceConfig,
        show,
        arguments=("base", "specialized"),
        help="Activation-space scores, roles, supplier tracing and validation curves (needs an anchor).",
    )
