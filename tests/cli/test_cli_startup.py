"""A command line that answers at once: help, config errors and prompt-file errors come before torch
is imported (checked by module, not by the clock, so a busy machine cannot fail it), help text keeps
words whole on a narrow terminal, and each command lists only the options it uses."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
from cli_testutil import assert_user_error, invoke, runner

from weightpatch import demo
from weightpatch.cli.main import app

PROBE = """
import json, sys
from weightpatch.cli.main import app
codes = []
for args in json.loads(sys.argv[1]):
    try:
        app(args)
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({"codes": codes, "heavy": [m for m in ("torch", "transformers", "pandas") if m in sys.modules]}))
"""


def probe(*commands: list[str]) -> dict:
    """Run ``wpatch`` commands in a fresh interpreter; their exit codes and the heavy modules imported."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([[str(a) for a in c] for c in commands])],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.splitlines()[-1])


def invoke_with_columns(columns: int, *args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": str(columns)})


def test_help_and_input_errors_do_not_import_torch(tmp_path):
    no_column = tmp_path / "p.csv"
    no_column.write_text("text,label\nhello there,1\n")
    base, spec = demo.paths().base, demo.paths().specialized
    commands = [
        ["--help"],
        *([name, "--help"] for name in ("check", "anchor", "screen", "trace", "merge", "report", "demo")),
        ["screen", base, spec, "--prompts", tmp_path / "missing.txt"],  # prompt file missing
        ["anchor", base, spec, "--prompts", no_column],  # a CSV without a prompt column
        ["screen", base, spec, "--prompts", no_column, "--top-k", "0"],  # invalid config
    ]
    result = probe(*commands)
    assert result["codes"] == [0] * 8 + [2, 2, 2]
    assert result["heavy"] == []


def test_narrow_help_keeps_words_whole_and_names_list_values():
    result = invoke_with_columns(60, "screen", "--help")
    assert "layer,module,head,neuron" in result.stdout  # was broken as "layer,mod / ule,..."
    assert "--kinds <kind,...>" in result.stdout and "list[str]" not in result.stdout
    merge = invoke_with_columns(60, "merge", "--help").stdout
    assert "--weights <float,...>" in merge and "--dtype" in merge and "--max-shard-size" in merge


def test_check_does_not_offer_a_seed():
    assert "--seed" not in invoke("check", "--help").stdout
    assert "--seed" in invoke("screen", "--help").stdout


def test_a_csv_without_a_prompt_column_is_one_line(tmp_path):
    bad = tmp_path / "p.csv"
    bad.write_text("text,label\nhello there,1\n")
    result = invoke("anchor", demo.paths().base, demo.paths().specialized, "--prompts", bad)
    assert_user_error(result, "needs a 'prompt' column", "text, label")


def test_a_csv_prompt_file_is_a_table_and_a_tiny_set_is_warned(tmp_path):
    """The issue's run: a CSV read as plain text made its header a prompt and gave an absurd
    separation from 4 "prompts" without a word. Now the rows are the prompts (6, split 3 + 3), and the
    tiny sets are named on stderr."""
    prompts = [r.prompt for r in demo.prompts("anchor")[:6]]
    table = tmp_path / "p.csv"
    pd.DataFrame({"id": range(6), "prompt": prompts}).to_csv(table, index=False)
    run = tmp_path / "run"
    paths = demo.paths()
    result = invoke(
        "anchor", paths.base, paths.specialized, "--prompts", table, "--method", "model_diff", "--layer", "1",
        "--steering-prompts", "0", "--run-dir", run, "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: only 3 training prompts from {table}: separations and mean scores from so few prompts are not "
        f"reliable; give at least 8",
        f"warning: only 3 held-out prompts from {table}: separations and mean scores from so few prompts are not "
        f"reliable; give at least 8",
    ]
