"""``wpatch report RUN_DIR``: the self-contained HTML report of a run directory."""

from __future__ import annotations

import typer

from weightpatch.cli import common
from weightpatch.cli.options import add_command
from weightpatch.config import ReportConfig


def show(cfg: ReportConfig) -> None:
    from weightpatch.report import build_report

    common.echo_path("report", build_report(cfg.run_dir, cfg.output))


def register(app: typer.Typer) -> None:
    add_command(
        app,
        "report",
        ReportConfig,
        show,
        arguments=("run_dir",),
        short={"output": "-o"},
        help="Write report.html (figures embedded) from RUN_DIR.",
    )
