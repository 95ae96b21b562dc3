"""Shared helpers of the CLI tests: an in-process runner and a tiny IFEval-style prompt file."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from conftest import write_prompts  # noqa: F401  (re-exported for the CLI tests)
from weightpatch.cli.main import app

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_user_error(result, *fragments: str) -> str:
    """Exit code 2, exactly one ``error:`` line naming the fragments, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
