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
    with pytest.raises(WeightPatchError, match="top_k, fraction or threshold"):
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


HD = 8  # head_dim of the tiny config: hidden 32 / 4 heads


def _slice_masks(space):
    """Hand-written masks (not from ComponentSpace) of the entries that L0 head 1 and L1 neuron 5 own
    in the tiny Llama: head 1 = query rows 8:16 and output-projection columns 8:16; neuron 5 = row 5
    of the up and gate projections and column 5 of the down projection."""
    masks = {n: [torch.zeros(s, dtype=torch.bool), torch.zeros(s, dtype=torch.bool)] for n, s in space.shapes.items()}
    masks[Q][0][HD : 2 * HD] = True
    masks[OPROJ][0][:, HD : 2 * HD] = True
    masks["model.layers.1.mlp.up_proj.weight"][1][5] = True
    masks["model.layers.1.mlp.gate_proj.weight"][1][5] = True
    masks[DOWN][1][:, 5] = True
    return masks


def test_slice_ownership_writes_exactly_the_owned_entries(space):
    standard = MergeConfig("ties", density=0.5, lam=0.7)
    m = owner_takes_top(space, [{"L0.attn.head1": 1.0}, {"L1.mlp.neuron5": 3.0}], top_k=1, standard=standard)
    masks = _slice_masks(space)
    for seed, name in enumerate(space.shapes):
        base, (a, b) = _tensors(space, name, seed=seed)
        out = m.merge_tensor(name, base, [a, b])
        std = ties(base, [a, b], density=0.5, lam=0.7)
        mask_a, mask_b = masks[name]
        expected = torch.where(mask_a, base + (a - base), torch.where(mask_b, base + (b - base), std))
        assert torch.equal(out, expected), name
        assert torch.equal(out != std, mask_a | mask_b), name  # nothing else differs from the standard merge


def test_owner_blend_with_surviving_deltas_equals_its_formula(space):
    scores_a = {"L1.attn": 0.9, "L1.mlp.neuron3": 0.6}  # neuron 3 normalized 2/3
    scores_b = {"L1.mlp": 2.0}  # normalized 1
    standard = MergeConfig(weights=(1.0, 0.5), lam=0.8)
    kw = {"top_k": 2, "standard": standard, "strength": 0.9, "others": 0.3, "rest": 0.5}
    blend = owner_takes_top(space, [scores_a, scores_b], conflict="blend", **kw)
    winner = owner_takes_top(space, [scores_a, scores_b], conflict="max", **kw)
    base, (a, b) = _tensors(space, DOWN)
    da, db = a - base, b - base
    out = blend.merge_tensor(DOWN, base, [a, b])
    # column 3: owned by A (2/3) and B (1): shares 0.4 / 0.6, nobody is a non-owner
    torch.testing.assert_close(out[:, 3], base[:, 3] + 0.9 * (0.4 * da[:, 3] + 0.6 * db[:, 3]))
    # elsewhere in L1.mlp: B alone owns; A survives with others * lam * w_A = 0.3 * 0.8 * 1.0
    torch.testing.assert_close(out[:, 4:], base[:, 4:] + 0.9 * db[:, 4:] + 0.24 * da[:, 4:])
    out = winner.merge_tensor(DOWN, base, [a, b])
    torch.testing.assert_close(out, base + 0.9 * db + 0.24 * da)  # B wins column 3 too (1 > 2/3)
    # unowned parameter: rest * the standard merge's delta = 0.5 * 0.8 * (1.0 da + 0.5 db)
    name = "model.layers.0.mlp.up_proj.weight"
    base, (a, b) = _tensors(space, name)
    expected = base + 0.5 * 0.8 * ((a - base) + 0.5 * (b - base))
    torch.testing.assert_close(blend.merge_tensor(name, base, [a, b]), expected)


def test_owner_blend_splits_evenly_when_owners_score_nothing(space):
    m = owner_takes_top(space, [{"L1.mlp": -1.0}, {"L1.mlp": -2.0}], top_k=1, conflict="blend")
    base, (a, b) = _tensors(space, UP)
    torch.testing.assert_close(m.merge_tensor(UP, base, [a, b]), base + 0.5 * (a - base) + 0.5 * (b - base))
    with pytest.raises(WeightPatchError, match="conflict rule"):
        owner_takes_top(space, [{"L1.mlp": 1.0}], top_k=1, conflict="vote")
