"""Streaming checkpoint merge: equals the in-memory formula, loads, is atomic, never touches inputs."""

from __future__ import annotations

import json

import pytest
import torch
from merging_testutil import build_tiny_checkpoints, dir_hashes
from safetensors.torch import load_file

from weightpatch.errors import PairMismatchError, WeightPatchError
from weightpatch.merging.methods import MergeConfig, task_arithmetic, ties
from weightpatch.merging.stream import Checkpoint, merge_checkpoints, parse_size


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    return build_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


def _state(path):
    c = Checkpoint(path)
    return {n: c.get(n) for n in c.names}


def _load_output(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for file in set(index["weight_map"].values()):
        out.update(load_file(path / file))
    assert set(out) == set(index["weight_map"])
    return out


def test_streaming_ties_equals_in_memory_and_loads(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    base, a, b = tiny_checkpoints
    before = {p: dir_hashes(p) for p in (base, a, b)}
    cfg = MergeConfig("ties", weights=(1.0, 0.6), density=0.5, lam=0.9)
    out = merge_checkpoints(base, [a, b], tmp_path / "merged", cfg, max_shard_size="30KB")
    merged = _load_output(out)
    sb, sa, sbb = _state(base), _state(a), _state(b)
    assert set(merged) == set(sb)
    for name, t in merged.items():
        torch.testing.assert_close(t, ties(sb[name], [sa[name], sbb[name]], [1.0, 0.6], 0.5, 0.9))
    files = sorted(f.name for f in out.iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= set(files)
    assert "weightpatch_merge.json" in files
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(model.state_dict()["model.norm.weight"], merged["model.norm.weight"])
    assert {p: dir_hashes(p) for p in (base, a, b)} == before
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp dir left behind


def test_out_dtype(tiny_checkpoints, tmp_path):
    base, a, b = tiny_checkpoints
    out = merge_checkpoints(base, [a, b], tmp_path / "m", MergeConfig(), out_dtype=torch.bfloat16)
    merged = _load_output(out)
    sb, sa, sbb = _state(base), _state(a), _state(b)
    name = "model.layers.1.mlp.up_proj.weight"
    assert merged[name].dtype == torch.bfloat16
    torch.testing.assert_close(merged[name], task_arithmetic(sb[name], [sa[name], sbb[name]]).bfloat16())


def test_failing_merger_leaves_nothing(tiny_checkpoints, tmp_path):
    base, a, b = tiny_checkpoints

    class Boom:
        n = 0

        def merge_tensor(self, name, base_t, experts):
            self.n += 1
            if self.n == 5:
                raise RuntimeError("boom")
            return base_t

    with pytest.raises(RuntimeError, match="boom"):
        merge_checkpoints(base, [a, b], tmp_path / "merged", Boom())
    assert list(tmp_path.iterdir()) == []


def test_refuses_nonempty_target_unless_overwrite(tiny_checkpoints, tmp_path):
    base, a, b = tiny_checkpoints
    target = tmp_path / "merged"
    target.mkdir()
    merge_checkpoints(base, [a], target, MergeConfig())  # empty dir is fine
    (target / "keep.txt").write_text("old")
    with pytest.raises(WeightPatchError, match="not empty"):
        merge_checkpoints(base, [a], target, MergeConfig())
    assert (target / "keep.txt").exists()
    merge_checkpoints(base, [a, b], target, MergeConfig(), overwrite=True)
    assert not (target / "keep.txt").exists()
    assert (target / "model.safetensors.index.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_refuses_output_inside_inputs(tiny_checkpoints):
    base, a, b = tiny_checkpoints
    before = dir_hashes(base)
    for target in (base, base / "sub", base.parent):
        with pytest.raises(WeightPatchError, match="overlaps the input"):
            merge_checkpoints(base, [a, b], target, MergeConfig(), overwrite=True)
    assert dir_hashes(base) == before


def test_mismatched_expert_error_lists_differences(tiny_checkpoints, tmp_path):
    from safetensors.torch import save_file

    base, a, _ = tiny_checkpoints
    state = _state(a)
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:10]
    del state["model.norm.weight"]
    state["extra.weight"] = torch.zeros(2)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(PairMismatchError) as err:
        merge_checkpoints(base, [a, bad], tmp_path / "out", MergeConfig())
    msg = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight has shape (10, 32)" in msg
    assert "model.norm.weight missing" in msg
    assert "extra.weight not in the base" in msg
    assert not (tmp_path / "out").exists()


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MiB") == 500 * 1024**2
    assert parse_size(123) == 123
    with pytest.raises(WeightPatchError):
        parse_size("lots")
