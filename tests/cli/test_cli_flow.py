"""The commands end to end on a tiny Llama pair: check, anchor, screen (resumed), report, merge,
and the demo pipeline with replaced models and prompts."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from cli_testutil import invoke, write_prompts

from conftest import make_pair, tree_hash
from weightpatch.results import ScoreTable
from weightpatch.rundir import RunDir


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    return make_pair("llama", tmp_path_factory.mktemp("cli-flow"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("flow-prompts") / "prompts.jsonl")


def test_check_prints_counts_and_weight_change(pair_dirs, tmp_path):
    result = invoke("check", *pair_dirs, "--run-dir", tmp_path / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "patchable pair" in result.stdout and "12 heads" in result.stdout and "144 neurons" in result.stdout
    delta = pd.read_parquet(tmp_path / "run" / "weight_delta.parquet")
    layered = delta[delta["layer"].notna()]
    assert set(layered["group"]) == {"attn", "mlp", "norm"} and set(layered["layer"]) == {0, 1, 2}
    assert set(delta.loc[delta["layer"].isna(), "group"]) >= {"embed", "norm.final"}  # model level: null layer
    assert (delta["relative_change"] > 0).all()


def test_anchor_screen_resume_report(pair_dirs, prompts, tmp_path):
    run = tmp_path / "run"
    common = ("--run-dir", run, "--no-progress")
    result = invoke(
        "anchor", *pair_dirs, "--prompts", prompts, "--max-new-tokens", "4", "--steering-prompts", "3", *common
    )
    assert result.exit_code == 0, result.output
    for name in ("anchor.json", "anchor.safetensors", "anchor_layers.parquet", "anchor_layers.csv", "steering.parquet"):
        assert (run / name).is_file(), name
    screen = ("screen", *pair_dirs, "--prompts", prompts, "--kinds", "head,module", "--top-k", "3", *common)
    result = invoke(*screen)
    assert result.exit_code == 0, result.output
    assert "top components" in result.stdout
    scores = ScoreTable.load(run / "scores.parquet")
    assert set(scores.frame["method"]) == {"first_order", "exact"}
    assert len(scores.select("exact")) == 6  # top 3 heads + top 3 modules
    verified = pd.read_parquet(run / "verified.parquet")
    assert {"first_order", "exact"} <= set(verified.columns) and len(verified) == 6

    # an interrupted exact pass: drop two exact rows; the re-run scores only those two
    frame = scores.frame
    exact_rows = frame[frame["method"] == "exact"]
    dropped = set(exact_rows["component"].iloc[:2])
    kept = frame.drop(exact_rows.index[:2])
    RunDir(run).save_table("scores", kept)
    result = invoke(*screen)
    assert result.exit_code == 0, result.output
    resumed = ScoreTable.load(run / "scores.parquet")
    assert len(resumed.select("exact")) == 6 and dropped <= set(resumed.select("exact").frame["component"])
    # the re-scored rows have the values of the uninterrupted run, the kept rows are untouched
    before = exact_rows.set_index("component")["score"]
    after = resumed.select("exact").frame.set_index("component")["score"]
    assert after[before.index].tolist() == pytest.approx(before.tolist(), abs=1e-6)
    log = (run / "log.txt").read_text()
    assert "resumed" in log and "2 components to score (4 already done)" in log

    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    text = (run / "report.html").read_text()
    assert "Anchor" in text and "Top components" in text and "data:image/png;base64," in text


def test_config_file_and_flags(pair_dirs, prompts, tmp_path):
    cfg = tmp_path / "screen.yaml"
    run = tmp_path / "run"
    cfg.write_text(yaml.safe_dump({"prompts": str(prompts), "method": "model_diff", "layer": 1, "steering-prompts": 0}))
    result = invoke("anchor", *pair_dirs, "--config", cfg, "--run-dir", run, "--no-progress")
    assert result.exit_code == 0, result.output
    recorded = yaml.safe_load((run / "config.yaml").read_text())["anchor"]
    assert recorded["method"] == "model_diff" and recorded["layer"] == 1
    result = invoke("anchor", *pair_dirs, "--config", cfg, "--layer", "2", "--run-dir", tmp_path / "run2")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "run2" / "config.yaml").read_text())["anchor"]["layer"] == 2


def test_screen_first_order_neurons(pair_dirs, prompts, tmp_path):
    run = tmp_path / "run"
    args = ("--run-dir", run, "--no-progress")
    assert invoke("anchor", *pair_dirs, "--prompts", prompts, "--steering-prompts", "0", *args).exit_code == 0
    result = invoke("screen", *pair_dirs, "--prompts", prompts, "--method", "first_order", "--kinds", "neuron", *args)
    assert result.exit_code == 0, result.output
    scores = ScoreTable.load(run / "scores.parquet")
    assert len(scores.select("first_order", "neuron")) == 144
    result = invoke("trace", *pair_dirs, "--prompts", prompts, "--targets", "L2.attn.head1", *args)
    assert result.exit_code == 0, result.output
    edges = pd.read_parquet(run / "supplier_edges.parquet")
    assert set(edges["target"]) == {"L2.attn.head1"} and {"supplier", "supply"} <= set(edges.columns)
    scores = ScoreTable.load(run / "scores.parquet")
    assert len(scores.select("activation", "head")) == len(scores.select("first_order", "head")) > 0
    roles = pd.read_parquet(run / "roles.parquet")
    assert set(roles["role"]) <= {"source", "router", "both", "neither"}
    levels = pd.read_parquet(run / "hierarchy.parquet")
    assert "L2.attn.head1" in set(levels.loc[levels["level_name"] == "router", "component"])
    assert (pd.read_parquet(run / "supplier_overlap.parquet")["fraction"].between(0, 1)).all()
    for curve in ("sufficiency", "necessity"):
        frame = pd.read_parquet(run / f"{curve}.parquet")
        assert {"k", "random_mean", "ranking"} <= set(frame.columns) and len(frame) > 0
    assert "Hierarchy" in (run / "report.html").read_text() if invoke("report", run).exit_code == 0 else False


def test_merge_baseline_and_mechanism(pair_dirs, prompts, tmp_path):
    base, sft = pair_dirs
    before = tree_hash(base), tree_hash(sft)
    run = tmp_path / "run"
    args = ("--run-dir", run, "--no-progress")
    assert invoke("anchor", *pair_dirs, "--prompts", prompts, "--steering-prompts", "0", *args).exit_code == 0
    result = invoke("screen", *pair_dirs, "--prompts", prompts, "--kinds", "head", "--top-k", "2", *args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "merged"
    result = invoke("merge", base, sft, "--output", out, "--method", "ties", "--density", "0.5", *args)
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file()
    result = invoke(
        "merge",
        base,
        sft,
        "--output",
        tmp_path / "mech",
        "--mechanism",
        "owner_takes_top",
        "--scores",
        run,
        "--top-k",
        "2",
        "--mergekit-yaml",
        tmp_path / "mergekit.yaml",
        *args,
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mergekit.yaml").is_file()
    table = pd.read_parquet(run / "merge_table.parquet")
    assert list(table["mechanism"]) == ["none", "owner_takes_top"]
    assert (tree_hash(base), tree_hash(sft)) == before


@pytest.mark.slow  # ~45 s on a busy 2-core machine; run with -m slow
def test_demo_pipeline_on_replaced_pair(pair_dirs, prompts, tmp_path):
    run = tmp_path / "demo"
    args = ("--base", pair_dirs[0], "--specialized", pair_dirs[1], "--prompts", prompts, "--heldout", prompts)
    small = ("--anchor-prompts", "8", "--screen-prompts", "6", "--steering-prompts", "2", "--top-k", "2")
    result = invoke("demo", *args, *small, "--run-dir", run, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "report:" in result.stdout and (run / "report.html").is_file()
    scores = ScoreTable.load(run / "scores.parquet")
    assert {"first_order", "exact"} <= set(scores.frame["method"])
    # re-running resumes: nothing recomputed, same scores
    result = invoke("demo", *args, *small, "--run-dir", run, "--no-progress")
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(ScoreTable.load(run / "scores.parquet").frame, scores.frame)
