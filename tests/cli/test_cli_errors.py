"""Bad input: every case is one line on stderr, exit code 2, no traceback (unless --debug), and
nothing is written into the input paths."""

from __future__ import annotations

import json

import pytest
import transformers
from cli_testutil import assert_user_error, invoke, write_prompts

from conftest import make_pair, save, tiny_model, tree_hash
from weightpatch.errors import WeightPatchError


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    return make_pair("llama", tmp_path_factory.mktemp("cli-errors"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


@pytest.fixture(scope="module")
def anchored_run(pair_dirs, prompts, tmp_path_factory):
    """A run directory holding an anchor (built once for the module)."""
    run = tmp_path_factory.mktemp("runs") / "anchored"
    result = invoke("anchor", *pair_dirs, "--prompts", prompts, "--run-dir", run, "--steering-prompts", "0")
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def inputs_unchanged(pair_dirs, prompts):
    before = [tree_hash(d) for d in pair_dirs] + [prompts.read_bytes()]
    yield
    assert [tree_hash(d) for d in pair_dirs] + [prompts.read_bytes()] == before


def test_nonexistent_model_path(pair_dirs, tmp_path, inputs_unchanged):
    result = invoke("check", pair_dirs[0], tmp_path / "no-such-model")
    assert_user_error(result, "does not exist")


def test_model_that_is_not_a_causal_lm(pair_dirs, tmp_path, inputs_unchanged):
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    bert = tmp_path / "bert"
    save(transformers.BertModel(config), bert)
    result = invoke("check", pair_dirs[0], bert)
    line = assert_user_error(result, "cannot be patched into each other", "model_type")
    assert "bert" in line.lower()


def test_mismatched_pair(pair_dirs, tmp_path, inputs_unchanged):
    wider = save(tiny_model("llama", intermediate_size=64), tmp_path / "wider")
    result = invoke("check", pair_dirs[0], wider)
    assert_user_error(result, "cannot be patched", "mlp.down_proj.weight")


def test_anchor_layer_out_of_range(pair_dirs, prompts, tmp_path, inputs_unchanged):
    run = tmp_path / "run"
    result = invoke("anchor", *pair_dirs, "--prompts", prompts, "--layer", "7", "--run-dir", run)
    assert_user_error(result, "layer 7 is out of range", "0..2")
    assert not run.exists()


def test_unknown_component_suggests_the_closest(pair_dirs, prompts, anchored_run, inputs_unchanged):
    args = ("screen", *pair_dirs, "--prompts", prompts, "--run-dir", anchored_run, "--method", "exact")
    result = invoke(*args, "--components", "L1.atn")
    assert_user_error(result, "unknown component 'L1.atn'", "did you mean 'L1.attn'")
    result = invoke(*args, "--components", "L1.attn.head9")
    assert_user_error(result, "head 9 is out of range")
    assert not (anchored_run / "scores.parquet").exists()


def test_empty_prompt_file(pair_dirs, tmp_path, inputs_unchanged):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = invoke("anchor", *pair_dirs, "--prompts", empty, "--run-dir", tmp_path / "run")
    assert_user_error(result, "no prompts")
    assert not (tmp_path / "run").exists()


def test_malformed_prompt_file(pair_dirs, tmp_path, inputs_unchanged):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"key": 1, "prompt": "a b"}) + "\n{not json\n")
    result = invoke("anchor", *pair_dirs, "--prompts", bad, "--run-dir", tmp_path / "run")
    assert_user_error(result, "bad.jsonl:1", "instruction_id_list")
    bad.write_text('{"key": 1, "prompt": "a", "instruction_id_list": [], "kwargs": []}\n{not json\n')
    result = invoke("anchor", *pair_dirs, "--prompts", bad, "--run-dir", tmp_path / "run")
    assert_user_error(result, "bad.jsonl:2", "invalid JSON")


def test_missing_prompt_option(pair_dirs, tmp_path):
    result = invoke("anchor", *pair_dirs, "--run-dir", tmp_path / "run")
    assert_user_error(result, "prompts", "missing")


def test_run_dir_from_a_different_config(pair_dirs, prompts, tmp_path, inputs_unchanged):
    run = tmp_path / "run"
    base = ("anchor", *pair_dirs, "--prompts", prompts, "--run-dir", run, "--steering-prompts", "0")
    assert invoke(*base).exit_code == 0
    before = sorted(p.name for p in run.iterdir())
    result = invoke(*base, "--method", "model_diff")
    assert_user_error(result, "different configuration", "method: 'instruction' -> 'model_diff'")
    assert sorted(p.name for p in run.iterdir()) == before


def test_run_dir_from_different_models(pair_dirs, prompts, tmp_path, anchored_run):
    other = make_pair("llama", tmp_path, scale=0.07)
    result = invoke("anchor", *other, "--prompts", prompts, "--run-dir", anchored_run, "--steering-prompts", "0")
    assert_user_error(result, "different specialized model")


def test_run_dir_inside_an_input_is_refused(pair_dirs, prompts, inputs_unchanged):
    result = invoke("anchor", *pair_dirs, "--prompts", prompts, "--run-dir", pair_dirs[0] / "run")
    assert_user_error(result, "inside the input")


def test_bad_config_file(pair_dirs, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prompts: p.jsonl\ntop_kk: 3\n")
    result = invoke("screen", *pair_dirs, "--config", cfg)
    assert_user_error(result, "top_kk: unknown option")
    cfg.write_text("- a\n- b\n")
    assert_user_error(invoke("screen", *pair_dirs, "--config", cfg), "must hold a mapping")


def test_debug_shows_the_exception(pair_dirs, tmp_path):
    result = invoke("check", pair_dirs[0], tmp_path / "missing", "--debug")
    assert result.exit_code != 0 and isinstance(result.exception, WeightPatchError)
    assert "does not exist" in str(result.exception)


def test_trace_without_anchor_is_a_clear_error(pair_dirs, prompts, tmp_path):
    result = invoke("trace", *pair_dirs, "--prompts", prompts, "--run-dir", tmp_path / "run")
    assert_user_error(result, "no anchor at", "wpatch anchor", "--anchor")
