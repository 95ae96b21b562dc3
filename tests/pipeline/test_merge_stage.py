"""The merge stage's score selection: which scores of --scores set a mechanism-aware merge."""

from __future__ import annotations

import pandas as pd
import pytest

from weightpatch.config import MergeStageConfig
from weightpatch.errors import WeightPatchError
from weightpatch.pipeline.merge import merger_of

SCORES = pd.DataFrame(
    {
        "component": ["L0.attn.head1", "L1.mlp", "L1.mlp.neuron3", "L0.attn"],
        "score": [0.9, 0.6, 0.5, 0.1],
        "method": ["exact"] * 4,
    }
)


def _config(llama_pair_dirs, tmp_path, **fields) -> MergeStageConfig:
    base, expert = llama_pair_dirs
    path = tmp_path / "scores.csv"
    SCORES.to_csv(path, index=False)
    return MergeStageConfig(
        base=str(base), experts=[str(expert)], output=tmp_path / "out", mechanism="owner_takes_top",
        scores=[path], **fields,
    )  # fmt: skip


def test_score_kinds_keep_only_those_granularities(llama_pair_dirs, tmp_path):
    every = merger_of(_config(llama_pair_dirs, tmp_path, top_k=2))
    assert every.selected == [["L0.attn.head1", "L1.mlp"]]
    modules = merger_of(_config(llama_pair_dirs, tmp_path, top_k=2, score_kinds="module"))
    assert modules.selected == [["L1.mlp", "L0.attn"]]
    fine = merger_of(_config(llama_pair_dirs, tmp_path, top_k=5, score_kinds=["head", "neuron"]))
    assert fine.selected == [["L0.attn.head1", "L1.mlp.neuron3"]]


def test_score_kinds_with_nothing_left_is_an_error(llama_pair_dirs, tmp_path):
    with pytest.raises(WeightPatchError, match="no layer scores; widen --score-kinds"):
        merger_of(_config(llama_pair_dirs, tmp_path, score_kinds="layer"))


def test_merge_dtype_and_shard_size_reach_the_written_model(llama_pair_dirs, tmp_path):
    """`wpatch merge --dtype float16 --max-shard-size 20KB`: the options merge_checkpoints always had."""
    from safetensors import safe_open

    from weightpatch.pipeline import run_merge

    base, expert = llama_pair_dirs
    cfg = MergeStageConfig(
        base=str(base), experts=[str(expert)], output=tmp_path / "out", dtype="float16", max_shard_size="20KB",
        progress=False,
    )  # fmt: skip
    out = run_merge(cfg).output
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        assert shard.stat().st_size < 20_000 + 2_000  # a shard is at most the size asked for (plus its header)
        with safe_open(shard, "pt") as f:
            assert {str(f.get_tensor(n).dtype) for n in f.keys()} == {"torch.float16"}  # noqa: SIM118
