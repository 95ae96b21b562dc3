"""Shared helpers of the CLI tests: an in-process runner and a tiny IFEval-style prompt file."""

from __future__ import annotations

import json
import random
from pathlib import Path

from typer.testing import CliRunner

from weightpatch.cli.main import app

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def write_prompts(path: Path, n: int = 16, seed: int = 0) -> Path:
    """Paired prompts (with / without a no-comma instruction) the tiny tokenizer can encode."""
    r = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            body = " ".join(r.choice("abcdefghij") for _ in range(r.randint(3, 6)))
            record = {
                "key": i,
                "prompt": f"{body} no comma please",
                "instruction_id_list": ["punctuation:no_comma"],
                "kwargs": [{}],
                "prompt_without_instruction": body,
            }
            f.write(json.dumps(record) + "\n")
    return path


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
