"""Which parameter entries a component patch changes, against index sets written out by hand from
each family's layout (not derived from ``ComponentSpace.resolve`` or its rule expansion).

Tiny dimensions (conftest): hidden 32, 4 heads of head_dim 8; KV heads: llama 2, gemma 1 (MQA);
MLP width 48 (GPT-2: 4 * 32 = 128, GPT-NeoX: 64). GPT-2's Conv1D weights are ``[in, out]`` with
``c_attn`` columns ``[Q | K | V]``; GPT-NeoX's ``query_key_value`` rows are ``[q | k | v]`` per
head, ``3 * head_dim`` rows per head.
"""

import pytest
import torch

from conftest import perturbed_copy, tiny_model
from weightpatch.components import ComponentSpace
from weightpatch.patch import patched
from weightpatch.weights import TensorDictSource

ALL = slice(None)


def rows(a: int, b: int) -> tuple:
    return (slice(a, b), ALL)


def cols(a: int, b: int) -> tuple:
    return (ALL, slice(a, b))


# family, component, include_kv -> {parameter: [index tuples of the entries it owns]}
EXPECTED = {
    ("gpt_neox", "L1.attn.head2", False): {
        "gpt_neox.layers.1.attention.query_key_value.weight": [rows(48, 56)],
        "gpt_neox.layers.1.attention.query_key_value.bias": [(slice(48, 56),)],
        "gpt_neox.layers.1.attention.dense.weight": [cols(16, 24)],
    },
    ("gpt_neox", "L1.attn.head2", True): {  # q, k and v rows of head 2: one block of 24 rows
        "gpt_neox.layers.1.attention.query_key_value.weight": [rows(48, 72)],
        "gpt_neox.layers.1.attention.query_key_value.bias": [(slice(48, 72),)],
        "gpt_neox.layers.1.attention.dense.weight": [cols(16, 24)],
    },
    ("gpt_neox", "L0.attn.v", False): {  # rows 16..24 of each head's 24-row block
        "gpt_neox.layers.0.attention.query_key_value.weight": [rows(h * 24 + 16, h * 24 + 24) for h in range(4)],
        "gpt_neox.layers.0.attention.query_key_value.bias": [(slice(h * 24 + 16, h * 24 + 24),) for h in range(4)],
    },
    ("gpt_neox", "L2.mlp.neuron5", False): {
        "gpt_neox.layers.2.mlp.dense_h_to_4h.weight": [rows(5, 6)],
        "gpt_neox.layers.2.mlp.dense_h_to_4h.bias": [(slice(5, 6),)],
        "gpt_neox.layers.2.mlp.dense_4h_to_h.weight": [cols(5, 6)],
    },
    ("gpt2", "L1.attn.head2", False): {
        "transformer.h.1.attn.c_attn.weight": [cols(16, 24)],
        "transformer.h.1.attn.c_attn.bias": [(slice(16, 24),)],
        "transformer.h.1.attn.c_proj.weight": [rows(16, 24)],
    },
    ("gpt2", "L1.attn.head2", True): {
        "transformer.h.1.attn.c_attn.weight": [cols(16, 24), cols(48, 56), cols(80, 88)],
        "transformer.h.1.attn.c_attn.bias": [(slice(16, 24),), (slice(48, 56),), (slice(80, 88),)],
        "transformer.h.1.attn.c_proj.weight": [rows(16, 24)],
    },
    ("gpt2", "L0.attn.k", False): {
        "transformer.h.0.attn.c_attn.weight": [cols(32, 64)],
        "transformer.h.0.attn.c_attn.bias": [(slice(32, 64),)],
    },
    ("gpt2", "L2.mlp.neuron100", False): {
        "transformer.h.2.mlp.c_fc.weight": [cols(100, 101)],
        "transformer.h.2.mlp.c_fc.bias": [(slice(100, 101),)],
        "transformer.h.2.mlp.c_proj.weight": [rows(100, 101)],
    },
    ("llama", "L1.attn.head3", True): {  # GQA: heads 2, 3 share KV head 1 (k/v rows 8..16)
        "model.layers.1.self_attn.q_proj.weight": [rows(24, 32)],
        "model.layers.1.self_attn.k_proj.weight": [rows(8, 16)],
        "model.layers.1.self_attn.v_proj.weight": [rows(8, 16)],
        "model.layers.1.self_attn.o_proj.weight": [cols(24, 32)],
    },
    ("llama", "L0.mlp.neuron47", False): {
        "model.layers.0.mlp.gate_proj.weight": [rows(47, 48)],
        "model.layers.0.mlp.up_proj.weight": [rows(47, 48)],
        "model.layers.0.mlp.down_proj.weight": [cols(47, 48)],
    },
    ("gemma", "L2.attn.head1", True): {  # MQA: every head shares KV head 0
        "model.layers.2.self_attn.q_proj.weight": [rows(8, 16)],
        "model.layers.2.self_attn.k_proj.weight": [rows(0, 8)],
        "model.layers.2.self_attn.v_proj.weight": [rows(0, 8)],
        "model.layers.2.self_attn.o_proj.weight": [cols(8, 16)],
    },
    ("qwen2", "L1.attn.head1", True): {  # q/k/v biases follow their rows
        "model.layers.1.self_attn.q_proj.weight": [rows(8, 16)],
        "model.layers.1.self_attn.q_proj.bias": [(slice(8, 16),)],
        "model.layers.1.self_attn.k_proj.weight": [rows(0, 8)],
        "model.layers.1.self_attn.k_proj.bias": [(slice(0, 8),)],
        "model.layers.1.self_attn.v_proj.weight": [rows(0, 8)],
        "model.layers.1.self_attn.v_proj.bias": [(slice(0, 8),)],
        "model.layers.1.self_attn.o_proj.weight": [cols(8, 16)],
    },
    ("qwen3", "L0.attn.head3", False): {  # q_norm/k_norm are shared by all heads: not a head's
        "model.layers.0.self_attn.q_proj.weight": [rows(24, 32)],
        "model.layers.0.self_attn.o_proj.weight": [cols(24, 32)],
    },
}


@pytest.mark.parametrize(("family", "component", "include_kv"), list(EXPECTED))
def test_patch_changes_exactly_the_hand_computed_entries(family, component, include_kv):
    model = tiny_model(family)
    donor = perturbed_copy(model)
    space = ComponentSpace.from_model(model, include_kv=include_kv)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    donor_values = dict(donor.named_parameters())
    expected = EXPECTED[(family, component, include_kv)]
    with patched(model, TensorDictSource.from_model(donor), space, [component]):
        for name, p in model.named_parameters():
            mask = torch.zeros(p.shape, dtype=torch.bool)
            for index in expected.get(name, []):
                mask[index] = True
            # every entry of the donor differs from the base, so "changed" is "owned"
            assert torch.equal(p != before[name], mask), f"{component} on {name}"
            assert torch.equal(p[mask], donor_values[name][mask]), name
    assert set(expected) <= set(before)
