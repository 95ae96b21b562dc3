"""What every stage reads the same way: weights checked for NaN/inf at the door (once per run
directory), and the check stage's explicit opt-out."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import make_pair, write_prompts
from test_finite import BAD, _poisoned
from weightpatch.cli.main import app


@pytest.fixture(scope="module")
def nan_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("nan-pair")
    base, sft = make_pair("llama", root)
    return base, _poisoned(sft, root / "nan-sft", float("nan")), write_prompts(root / "p.jsonl")


def _invoke(*words):
    return CliRunner().invoke(app, [str(w) for w in words])


def test_anchor_refuses_nan_weights_and_saves_nothing(nan_pair, tmp_path):
    """Once, `wpatch anchor` on a NaN specialized model exited 0 with an all-NaN anchor."""
    base, sft, prompts = nan_pair
    result = _invoke("anchor", base, sft, "--prompts", prompts, "--steering-prompts", "0", "--run-dir", tmp_path / "r")
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert f"the specialized model ({sft}) has non-finite weights: {BAD} (3 NaN, 0 inf)" in line
    assert not (tmp_path / "r" / "anchor.json").exists()


def test_check_refuses_nan_weights_unless_allowed(nan_pair, tmp_path):
    base, sft, _ = nan_pair
    refused = _invoke("check", base, sft, "--no-progress")
    assert refused.exit_code == 2 and "non-finite weights" in refused.stderr
    allowed = _invoke("check", base, sft, "--allow-nonfinite", "--no-progress")
    assert allowed.exit_code == 0, allowed.output
    assert f"warning: the specialized model has non-finite weights: {BAD} (3 NaN, 0 inf)" in allowed.stderr


def test_finiteness_is_checked_once_per_run_directory(tmp_path):
    base, sft = make_pair("llama", tmp_path / "pair")
    prompts = write_prompts(tmp_path / "p.jsonl")
    run = tmp_path / "run"
    result = _invoke("anchor", base, sft, "--prompts", prompts, "--steering-prompts", "0", "--run-dir", run)
    assert result.exit_code == 0, result.output
    record = json.loads((run / "run.json").read_text())
    assert len(record["finite_weights"]) == 2 and all(len(h) == 64 for h in record["finite_weights"])
