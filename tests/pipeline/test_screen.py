"""The screen stage from Python: the method asked for is the method computed (with or without named
components), and Python and the CLI give identical tables for one config."""

from __future__ import annotations

import logging
import re

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import write_prompts
from weightpatch.cli.main import app
from weightpatch.config import AnchorConfig, ScreenConfig
from weightpatch.pipeline import open_pair, run_anchor, run_screen
from weightpatch.rundir import RunDir


@pytest.fixture(scope="module")
def anchored(llama_pair_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("screen-stage")
    prompts = write_prompts(root / "p.jsonl")
    base, sft = map(str, llama_pair_dirs)
    cfg = AnchorConfig(base=base, specialized=sft, prompts=prompts, steering_prompts=0, run_dir=root / "run")
    pair = open_pair(cfg)
    run_anchor(cfg, pair)
    return pair, cfg


def screen_cfg(anchored, run_dir, **fields) -> ScreenConfig:
    _, acfg = anchored
    return ScreenConfig(
        base=acfg.base, specialized=acfg.specialized, prompts=acfg.prompts, anchor=acfg.run_path / "anchor",
        run_dir=run_dir, progress=False, **fields,
    )  # fmt: skip


def test_first_order_of_named_components_is_first_order(anchored, tmp_path):
    """`--method first_order --components ...` once computed integrated gradients (steps=8) and labelled them so."""
    pair, _ = anchored
    names = ["L1.attn.head2", "L0.mlp", "L2.mlp.neuron5"]
    named = run_screen(screen_cfg(anchored, tmp_path / "a", method="first_order", components=names), pair)
    assert set(named.scores.frame["method"]) == {"first_order"}
    every = run_screen(screen_cfg(anchored, tmp_path / "b", method="first_order", kinds=["head", "module", "neuron"]))
    by_name = every.scores.frame.set_index("component").loc[names, "score"]
    ours = named.scores.frame.set_index("component").loc[names, "score"]
    pd.testing.assert_series_equal(ours, by_name, rtol=1e-9)
    ig = run_screen(screen_cfg(anchored, tmp_path / "c", method="integrated_gradients", components=names), pair)
    assert set(ig.scores.frame["method"]) == {"integrated_gradients"}


def test_python_and_cli_give_identical_tables(anchored, tmp_path):
    pair, acfg = anchored
    cfg = screen_cfg(anchored, tmp_path / "py", kinds=["head", "module"], top_k=3)
    python = run_screen(cfg, pair)
    cli_run = tmp_path / "cli"
    words = [
        "screen", acfg.base, acfg.specialized, "--prompts", acfg.prompts, "--anchor", acfg.run_path / "anchor",
        "--kinds", "head,module", "--top-k", "3", "--run-dir", cli_run, "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(app, [str(w) for w in words])
    assert result.exit_code == 0, result.output
    assert re.search(r"exact sweep: \d components in \d layers?, estimated", result.output)  # the verification's
    for table in ("scores", "verified"):  # both read back the same way from their run directories
        ours, theirs = (pd.read_parquet(run / f"{table}.parquet") for run in (python.run_dir, cli_run))
        pd.testing.assert_frame_equal(ours, theirs, check_exact=True)


def test_prompt_format_is_explicit_and_recorded(anchored, tmp_path):
    import json

    pair, _ = anchored
    raw = run_screen(screen_cfg(anchored, tmp_path / "raw", method="first_order", kinds=["head"], prompt_format="raw"))
    record = json.loads((raw.run_dir / "run.json").read_text())
    assert record["commands"]["screen"]["prompt_format"] == "raw"
    auto = run_screen(screen_cfg(anchored, tmp_path / "auto", method="first_order", kinds=["head"]), pair)
    # the tiny tokenizer has no chat template: auto is raw, recorded as what was used
    assert json.loads((auto.run_dir / "run.json").read_text())["commands"]["screen"]["prompt_format"] == "raw"
    pd.testing.assert_frame_equal(raw.scores.frame, auto.scores.frame, check_exact=True)


def test_verify_with_the_local_exact_screen(anchored, tmp_path):
    pair, _ = anchored
    result = run_screen(
        screen_cfg(anchored, tmp_path / "le", method="verify", screen="local_exact", kinds=["head", "module"], top_k=2),
        pair,
    )
    frame = result.scores.frame
    assert set(frame["method"]) == {"local_exact", "exact"}
    local = frame[frame["method"] == "local_exact"]
    for kind in ("head", "module"):
        top = local[local["kind"] == kind].sort_values("score", key=abs, ascending=False)["component"].head(2)
        assert set(top) <= set(result.verified["component"])
    assert {"local_exact", "exact"} <= set(result.verified.columns) and len(result.verified) == 4


def test_interrupted_exact_neuron_sweep_resumes_with_an_estimate_of_the_rest(anchored, tmp_path, monkeypatch, caplog):
    """An exact neuron sweep stopped after its first finished shard, resumed in the same run
    directory: the finished neurons are not scored again (the estimate counts only the rest) and
    the table equals an uninterrupted run's."""
    pair, _ = anchored
    reference = run_screen(screen_cfg(anchored, tmp_path / "ref", method="exact", kinds=["neuron"]), pair)
    appended: list[set[str]] = []
    real_append = RunDir.append_scores

    def append_then_stop(run, table):
        real_append(run, table)
        appended.append(set(table.frame["component"]))
        if len(appended) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "append_scores", append_then_stop)
    cfg = screen_cfg(anchored, tmp_path / "run", method="exact", kinds=["neuron"])
    with pytest.raises(KeyboardInterrupt):
        run_screen(cfg, pair)
    first = appended[0]
    with caplog.at_level(logging.INFO, logger="weightpatch"):
        resumed = run_screen(cfg, pair)
    assert not first & set().union(*appended[1:])  # nothing scored twice
    frame = resumed.scores.frame
    layer = RunDir(cfg.run_path).record()["screening"]["anchor_layer"]
    rest = frame[(frame["layer"] <= layer) & ~frame["component"].isin(first)]
    assert len(rest) and f"exact neuron sweep: {len(rest)} neurons in" in caplog.text
    assert f"({len(first)} already done)" in caplog.text
    ours, theirs = (t.frame.sort_values("component").reset_index(drop=True) for t in (resumed.scores, reference.scores))
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)


def test_a_pair_opened_with_other_settings_is_refused_before_anything_is_written(anchored, tmp_path):
    """The issue: a float32 pair with ScreenConfig(dtype="float64") ran in float32 and recorded float64."""
    from weightpatch.errors import WeightPatchError

    pair, _ = anchored
    other_dtype = screen_cfg(anchored, tmp_path / "r", method="first_order", dtype="float64")
    with pytest.raises(WeightPatchError, match=r"dtype 'float32' \(pair\) vs 'float64' \(config\)"):
        run_screen(other_dtype, pair)
    assert pair.options["dtype"] == "float32"
    other_model = screen_cfg(anchored, tmp_path / "r", method="first_order").model_copy(
        update={"specialized": str(tmp_path)}
    )
    with pytest.raises(WeightPatchError, match=r"specialized .* \(pair\) vs .* \(config\)"):
        run_screen(other_model, pair)
    assert not (tmp_path / "r").exists()
