"""``wpatch trace``: supplier -> target tracing (SPEC section 7), when :mod:`weightpatch.tracing` exists."""

from __future__ import annotations

import importlib.util

import typer

from weightpatch.cli import common
from weightpatch.errors import WeightPatchError


def trace(
    base: common.BaseArg,
    specialized: common.SpecArg,
    prompts: common.PromptsOpt = None,
    config: common.ConfigOpt = None,
    run_dir: common.RunDirOpt = None,
    debug: common.DebugOpt = False,
) -> None:
    """Trace which upstream components supply the top activation-space heads (not yet available)."""
    if importlib.util.find_spec("weightpatch.tracing") is None:
        raise WeightPatchError(
            "`wpatch trace` is not yet available: the tracing module has not landed in this version "
            "(use `wpatch screen` for weight-space scores)"
        )
    raise WeightPatchError("`wpatch trace` is not yet wired to weightpatch.tracing in this version")


def register(app: typer.Typer) -> None:
    app.command("trace")(common.handle_errors(trace))
