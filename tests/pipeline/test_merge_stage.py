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
