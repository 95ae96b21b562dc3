"""Terminal manners: printed paths never wrap, no progress bar when not asked or not on a terminal."""

from __future__ import annotations

from cli_testutil import invoke


def test_a_long_path_is_printed_on_one_line_in_a_narrow_terminal(llama_pair_dirs, tmp_path, monkeypatch):
    run = tmp_path / ("r" * max(1, 81 - len(str(tmp_path)) - 1))
    assert len(str(run / "weight_delta.parquet")) > 81
    monkeypatch.setenv("COLUMNS", "40")
    result = invoke("check", *llama_pair_dirs, "--run-dir", run, "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"weight delta table: {run / 'weight_delta.parquet'}" in result.stdout.splitlines()


def test_no_progress_prints_no_bar(llama_pair_dirs, tmp_path):
    result = invoke("check", *llama_pair_dirs, "--run-dir", tmp_path / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    for mark in ("it/s", "tensor/s", "█", "%|"):
        assert mark not in result.output
