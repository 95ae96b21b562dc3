"""``wpatch report RUN_DIR``: write the self-contained HTML report of a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weightpatch.cli import common


def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by wpatch.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="[default: RUN_DIR/report.html]")] = None,
    debug: common.DebugOpt = False,
) -> None:
    """Write report.html (figures embedded) from the results in RUN_DIR."""
    from weightpatch.report import build_report

    path = build_report(run_dir, output)
    common.echo_path("report", path)


def register(app: typer.Typer) -> None:
    app.command("report")(common.handle_errors(report))
