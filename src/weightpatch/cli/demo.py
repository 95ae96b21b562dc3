"""``wpatch demo``: flags -> :class:`~weightpatch.config.DemoConfig` -> :func:`~weightpatch.pipeline.run_demo`."""

from __future__ import annotations

import typer

from weightpatch.cli import common
from weightpatch.cli.options import add_command
from weightpatch.config import DemoConfig


def show(cfg: DemoConfig) -> None:
    from weightpatch.cli import summary
    from weightpatch.pipeline import run_demo

    result = run_demo(cfg.model_copy(update={"progress": common.progress_wanted(cfg.progress)}))
    summary.print_summary(result.run_dir)
    common.out.print(f"done in {result.timings_seconds['total']:.0f} s")
    common.echo_path("report", result.report.resolve())


def register(app: typer.Typer) -> None:
    add_command(
        app, "demo", DemoConfig, show, help="Run the whole pipeline on the embedded model pair and write the report."
    )
