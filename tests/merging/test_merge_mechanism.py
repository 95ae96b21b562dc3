"""Mechanism-aware merge: owners' deltas land exactly on their top components."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from merging_testutil import build_tiny_checkpoints, tiny_config

from weightpatch.components import ComponentSpace
from weightpatch.errors import WeightPatchError
from weightpatch.merging.mechanism import (
    component_space_for_checkpoint,
    load_scores,
    normalized_scores,
    owner_takes_top,
    score_weighted,
    select_components,
)
from weightpatch.merging.methods import MergeConfig, task_arithmetic, ties
from weightpatch.merging.stream import Checkpoint, merge_checkpoints


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    return build_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="module")
def space():
    from transformers import AutoModelForCausalLM

    return ComponentSpace.from_model(AutoModelForCausalLM.from_config(tiny_config()))


def _tensors(space, name, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = space.shapes[name]
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) for _ in range(n)]


Q = "model.layers.0.self_attn.q_proj.weight"
OPROJ = "model.layers.0.self_attn.o_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"

SCORES_A = pd.DataFrame({"component": ["L0.attn.head1", "L1.mlp.neuron3", "L1.attn"], "score": [0.9, 0.6, 0.1]})
SCORES_B = {"L1.mlp": 2.0, "L0.attn.head2": 1.0, "L0.mlp": -0.5}


def test_scores_loading_normalizing_selecting():
    assert load_scores(SCORES_A) == {"L0.attn.head1": 0.9, "L1.mlp.neuron3": 0.6, "L1.attn": 0.1}
    assert normalized_scores(SCORES_B) == {"L1.mlp": 1.0, "L0.attn.head2": 0.5, "L0.mlp": 0.0}
    assert select_components(SCORES_B, top_k=2) == ["L1.mlp", "L0.attn.head2"]
    assert select_components(SCORES_B, threshold=1.5) == ["L1.mlp"]
    with pytest.raises(WeightPatchError, match="columns"):
        load_scores(pd.DataFrame({"name": ["L0"], "score": [1.0]}))


def test_owner_takes_top_puts_owner_delta_exactly_on_its_components(space):
    m = owner_takes_top(space, [SCORES_A, SCORES_B], top_k=2, standard=MergeConfig("ties", density=0.5))
    assert m.selected == [["L0.attn.head1", "L1.mlp.neuron3"], ["L1.mlp", "L0.attn.head2"]]
    hd = 8
    base, (a, b) = _tensors(space, Q)
    out = m.merge_tensor(Q, base, [a, b])
    std = ties(base, [a, b], density=0.5)
    torch.testing.assert_close(out[hd : 2 * hd], a[hd : 2 * hd])  # A's head 1: base + delta_A
    torch.testing.assert_close(out[2 * hd : 3 * hd], b[2 * hd : 3 * hd])  # B's head 2
    torch.testing.assert_close(out[:hd], std[:hd])  # nobody's: standard merge
    torch.testing.assert_close(out[3 * hd :], std[3 * hd :])
    base, (a, b) = _tensors(space, OPROJ)
    out = m.merge_tensor(OPROJ, base, [a, b])
    torch.testing.assert_close(out[:, hd : 2 * hd], a[:, hd : 2 * hd])  # O columns of head 1
    # conflict: neuron 3 of L1 is in A's L1.mlp.neuron3 (norm 0.6/0.9) and B's L1.mlp (norm 1.0)
    base, (a, b) = _tensors(space, UP)
    out = m.merge_tensor(UP, base, [a, b])
    torch.testing.assert_close(out, b)  # B wins everywhere in L1.mlp
    # untouched parameters: exactly the standard merge
    name = "model.layers.0.mlp.up_proj.weight"
    base, (a, b) = _tensors(space, name)
    torch.testing.assert_close(m.merge_tensor(name, base, [a, b]), ties(base, [a, b], density=0.5))


def test_owner_conflict_higher_normalized_score_wins(space):
    # A's neuron 3 normalized 1.0 beats B's L1.mlp at 0.5
    m = owner_takes_top(space, [{"L1.mlp.neuron3": 0.2}, {"L1.mlp": 2.0, "L0.attn": 4.0}], top_k=2, strength=0.5)
    base, (a, b) = _tensors(space, DOWN)
    out = m.merge_tensor(DOWN, base, [a, b])
    torch.testing.assert_close(out[:, 3], base[:, 3] + 0.5 * (a[:, 3] - base[:, 3]))
    torch.testing.assert_close(out[:, 4:], base[:, 4:] + 0.5 * (b[:, 4:] - base[:, 4:]))


def test_score_weighted_weights(space):
    m = score_weighted(space, [SCORES_A, SCORES_B], floor=0.2, standard=MergeConfig(lam=0.5))
    base, (a, b) = _tensors(space, DOWN)
    out = m.merge_tensor(DOWN, base, [a, b])
    wa = torch.full(space.shapes[DOWN], 0.2)
    wa[:, 3] = 0.6 / 0.9
    wb = torch.ones(space.shapes[DOWN])  # B's L1.mlp has normalized score 1
    torch.testing.assert_close(out, task_arithmetic(base, [a, b], [wa, wb], lam=0.5))
    # L1.attn: A scored 0.1/0.9 < floor -> floor; B nothing -> floor
    name = "model.layers.1.self_attn.v_proj.weight"
    base, (a, b) = _tensors(space, name)
    torch.testing.assert_close(m.merge_tensor(name, base, [a, b]), task_arithmetic(base, [a, b], [0.2, 0.2], 0.5))


def test_validation(space):
    with pytest.raises(WeightPatchError, match="top_k or threshold"):
        owner_takes_top(space, [SCORES_A], top_k=None)
    with pytest.raises(WeightPatchError, match="unknown component"):
        owner_takes_top(space, [{"L7.mlp": 1.0}], top_k=1)


def test_mechanism_merge_streams(tiny_checkpoints, tmp_path):
    base, a, b = tiny_checkpoints
    space = component_space_for_checkpoint(base)
    m = owner_takes_top(space, [SCORES_A, SCORES_B], top_k=2)
    out = merge_checkpoints(base, [a, b], tmp_path / "m", m, max_shard_size="40KB")
    o = Checkpoint(out)
    cb = Checkpoint(base)
    ca = Checkpoint(a)
    cbb = Checkpoint(b)
    q = o.get(Q)
    torch.testing.assert_close(q[8:16], ca.get(Q)[8:16])
    torch.testing.assert_close(o.get(UP), cbb.get(UP))
    name = "model.layers.0.mlp.gate_proj.weight"
    torch.testing.assert_close(o.get(name), task_arithmetic(cb.get(name), [ca.get(name), cbb.get(name)]))
