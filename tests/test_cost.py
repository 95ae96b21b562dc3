"""The cost model (weightpatch.cost) and the prediction each stage prints (pipeline.forecast): shapes
counted from a config match the real model, predicted memory and time of a forward match the measured
ones within stated tolerances, stages print the prediction before loading, and refuse with one line
when the memory will not fit."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli.cli_testutil import assert_user_error, invoke
from conftest import save, tiny_config, tiny_model
from weightpatch import cost
from weightpatch.config import CheckConfig
from weightpatch.errors import WeightPatchError
from weightpatch.pipeline import forecast as forecast_module
from weightpatch.pipeline import run_check
from weightpatch.pipeline.check import weight_delta_table
from weightpatch.pipeline.inputs import open_pair

TESTS = Path(__file__).parent
# Tolerances of the prediction of a forward pass (one process, same moment): memory the stage adds
# within 25% (the goal), time within a factor 2 (the shared machine's load moves rates).
MEMORY_TOLERANCE, TIME_FACTOR = 0.25, 2.0


@pytest.mark.parametrize("tied", [True, False])
def test_shape_counts_the_real_models_parameters(tied):
    config = tiny_config("llama", tie_word_embeddings=tied)
    shape = cost.shape_of_config(config, "bfloat16")
    model = tiny_model("llama", tie_word_embeddings=tied)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.layers == config.num_hidden_layers
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert shape.block_params == block
    assert shape.unembed_params == (0 if tied else model.lm_head.weight.numel())
    assert shape.model_bytes == 2 * shape.params
    assert shape.load_bytes == shape.model_bytes + 4 * shape.params  # stored in float32, loaded in bfloat16


def test_more_prompts_and_components_cost_more():
    shape = cost.shape_of_config(tiny_config("llama"), "float32")
    rates = cost.Rates(flops=1e9, elements=1e8, copy=1e9)
    small = cost.Workload(tokens=(10,) * 4, batch_size=4, anchor_layer=1, exact_depth=10)
    large = cost.Workload(tokens=(10,) * 8, batch_size=4, anchor_layer=1, exact_depth=40)
    for stage in ("first_order", "exact", "anchor"):
        assert cost.predict(stage, shape, rates, large, 0).seconds > cost.predict(stage, shape, rates, small, 0).seconds
    wide = cost.Workload(tokens=(10,) * 16, batch_size=16, anchor_layer=1)
    assert (
        cost.predict("forward", shape, rates, wide, 0).peak_bytes
        > cost.predict("forward", shape, rates, small, 0).peak_bytes
    )
    loaded = cost.predict("first_order", shape, rates, small, 0, loaded=True)
    fresh = cost.predict("first_order", shape, rates, small, 0)
    assert fresh.new_bytes - loaded.new_bytes == pytest.approx(shape.model_bytes)
    assert loaded.load_seconds == 0 < fresh.load_seconds


PROBE = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
from weightpatch import cost
from weightpatch.pair import load_pair, _torch_dtype
from weightpatch.pipeline.forecast import resident_bytes
from weightpatch.runner import encode
root, dtype = sys.argv[1], sys.argv[2]
texts = ["abc def ghi jkl " * 5] * 8
shape = cost.model_shape(root, dtype)
rates = cost.measure_rates(shape, _torch_dtype(dtype))
before = resident_bytes()
pair = load_pair(root, root, dtype=dtype)
batch = encode(pair.tokenizer, texts)
work = cost.Workload(tuple(int(n) for n in batch.attention_mask.sum(1)), batch_size=8)
prediction = cost.predict("forward", shape, rates, work, before)
start = time.perf_counter()
with torch.no_grad():
    pair.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"predicted_new": prediction.new_bytes, "measured_new": peak - before,
                  "predicted_s": prediction.seconds - prediction.load_seconds, "measured_s": seconds}))
"""


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory) -> Path:
    """A 45M-parameter float32 Llama (so the model, not the runtime, sets the memory it adds)."""
    config = tiny_config(
        "llama", num_layers=4, hidden_size=512, intermediate_size=1376, vocab_size=32000,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    return save(AutoModelForCausalLM.from_config(config), tmp_path_factory.mktemp("mid") / "m")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_prediction_matches_measurement(mid_model, dtype):
    """Memory a load + forward adds (peak RSS in a fresh process) and the forward's time, predicted from
    the config and the machine's rates, vs measured (bfloat16 from a float32 checkpoint: the checkpoint's
    pages count too)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(mid_model), dtype], capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(got["predicted_new"] / got["measured_new"] - 1) <= MEMORY_TOLERANCE, got
    assert 1 / TIME_FACTOR <= got["predicted_s"] / got["measured_s"] <= TIME_FACTOR, got


def test_stage_prints_its_prediction_before_loading(llama_pair_dirs, caplog):
    base, sft = map(str, llama_pair_dirs)
    with caplog.at_level(logging.INFO, logger="weightpatch"):
        run_check(CheckConfig(base=base, specialized=sft, progress=False))
    messages = [r.getMessage() for r in caplog.records]
    predicted = next(i for i, m in enumerate(messages) if m.startswith("check: predicted peak"))
    loading = next(i for i, m in enumerate(messages) if m.startswith("loading "))
    assert predicted < loading


def test_refuses_when_memory_will_not_fit(llama_pair_dirs, monkeypatch):
    base, sft = map(str, llama_pair_dirs)
    monkeypatch.setattr(forecast_module, "available_bytes", lambda device="cpu": 1e6)
    with pytest.raises(WeightPatchError) as info:
        run_check(CheckConfig(base=base, specialized=sft, progress=False))
    message = str(info.value)
    assert "\n" not in message and "0.0 GB are available" in message
    for fix in ("--dtype bfloat16", "LoRA", "--max-prompts", "--device-map auto", "--backend ray"):
        assert fix in message


def test_cli_refusal_is_one_error_line(llama_pair_dirs, monkeypatch):
    base, sft = map(str, llama_pair_dirs)
    monkeypatch.setattr(forecast_module, "available_bytes", lambda device="cpu": 1e6)
    assert_user_error(invoke("check", base, sft), "more memory", "--dtype bfloat16")


def test_generous_budget_runs(llama_pair_dirs, monkeypatch):
    """The refusal is a comparison with the budget, not a fixed threshold: the same check runs with 64 GB."""
    base, sft = map(str, llama_pair_dirs)
    monkeypatch.setattr(forecast_module, "available_bytes", lambda device="cpu": 64 * 2**30)
    assert len(run_check(CheckConfig(base=base, specialized=sft, progress=False)).weight_delta)


def test_weight_delta_chunks_sum_to_the_whole(llama_pair_dirs, monkeypatch):
    base, sft = map(str, llama_pair_dirs)
    pair = open_pair(CheckConfig(base=base, specialized=sft))
    whole = weight_delta_table(pair, progress=False)
    monkeypatch.setattr("weightpatch.pipeline.check.CHUNK_ELEMENTS", 7)  # many chunks, ragged ends
    chunked = weight_delta_table(pair, progress=False)
    assert chunked["relative_change"].tolist() == pytest.approx(whole["relative_change"].tolist(), rel=1e-12)
    assert chunked["parameters"].tolist() == whole["parameters"].tolist()


def test_unreadable_base_leaves_the_error_to_the_stage(tmp_path):
    """No prediction for a base whose config cannot be read; the stage's own one-line error follows."""
    assert forecast_module.forecast("check", CheckConfig(base=str(tmp_path / "nope"), specialized="x")) is None
    assert_user_error(invoke("check", tmp_path / "nope", tmp_path / "nope2"), "does not exist")


def test_a_stage_given_another_stages_config_is_a_bug_named_at_once(tmp_path):
    """workload() narrows the config to its stage's class (what mypy checks): a mismatch is a TypeError."""
    cfg = CheckConfig(base="b", specialized="s")
    for stage, name in (("merge", "MergeStageConfig"), ("anchor", "AnchorConfig"), ("trace", "TraceConfig")):
        with pytest.raises(TypeError, match=f"the {stage} stage takes a {name}, not a CheckConfig"):
            forecast_module.workload(stage, cfg, None, None)
    assert forecast_module.workload("check", cfg, None, None)[0] == "check"
