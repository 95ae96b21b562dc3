"""``wpatch screen``: flags -> :class:`~weightpatch.config.ScreenConfig` -> :func:`~weightpatch.pipeline.run_screen`."""

from __future__ import annotations

import typer

from weightpatch.cli import common
from weightpatch.cli.options import add_command
from weightpatch.config import ScreenConfig


def show(cfg: ScreenConfig) -> None:
    from weightpatch.cli import summary
    from weightpatch.pipeline import run_screen

    result = run_screen(cfg.model_copy(update={"progress": common.progress_wanted(cfg.progress)}))
    summary.print_summary(result.run_dir, result.scores)
    common.echo_path("run directory", result.run_dir)


def register(app: typer.Typer) -> None:
    add_command(
        app,
        "screen",
        ScreenConfig,
        show,
        arguments=("base", "specialized"),
        help="Score components by how much of the anchor gap their own specialized weights recover.",
    )
