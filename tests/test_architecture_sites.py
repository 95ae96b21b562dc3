"""Declared activation sites, per family: each site is the tensor the model computes there.

The sites are hooks on declared submodules; these tests check that the declarations name the
right submodules, by relations that hold only for the right ones: the head-output module applied
to the head sites gives the attention site, the neuron-activation module applied to the neuron
sites gives the MLP site, the block and embed sites are the model's own hidden states, and the
head / neuron channel ranges tile the read-out module's input.
"""

import pytest
import torch

from conftest import FAMILIES, perturbed_copy, save, tiny_model, tiny_texts, token_batch
from weightpatch.activation import capturing, patched_residual
from weightpatch.components import ComponentSpace
from weightpatch.pair import load_pair
from weightpatch.runner import encode


def _capture(model, space, names, ids):
    sites = [space.site(n) for n in names]
    store: dict = {}
    with torch.no_grad(), capturing(model, sites, store):
        hidden = model(ids, output_hidden_states=True).hidden_states
    return sites, store, hidden


def _channels(sites) -> torch.Tensor:
    return torch.cat([torch.arange(s.start, s.stop) for s in sites])


@pytest.mark.parametrize("family", FAMILIES)
def test_each_declared_site_is_the_tensor_the_model_computes_there(family):
    model = tiny_model(family)
    space = ComponentSpace.from_model(model)
    heads = [f"L1.attn.head{h}" for h in range(space.num_heads)]
    neurons = [f"L1.mlp.neuron{j}" for j in range(space.num_neurons(1))]
    ids = token_batch(n=2, length=7)
    sites, store, hidden = _capture(model, space, ["embed", "L0", "L1", "L1.attn", "L1.mlp", *heads, *neurons], ids)
    embed, block0, block1, attn, mlp = (store[s.key] for s in sites[:5])
    torch.testing.assert_close(embed, hidden[0])  # the input of block 0 (scaled embeddings for Gemma)
    torch.testing.assert_close(block0, hidden[1])
    torch.testing.assert_close(block1, hidden[2])
    head_sites, neuron_sites = sites[5 : 5 + len(heads)], sites[5 + len(heads) :]
    o_proj = model.get_submodule(head_sites[0].module)
    down = model.get_submodule(neuron_sites[0].module)
    per_head, activations = store[head_sites[0].key], store[neuron_sites[0].key]
    # heads tile the read-out's input channels in order; neurons likewise
    assert torch.equal(_channels(head_sites), torch.arange(per_head.shape[-1]))
    assert torch.equal(_channels(neuron_sites), torch.arange(activations.shape[-1]))
    with torch.no_grad():
        torch.testing.assert_close(o_proj(per_head), attn)  # head outputs read out = attention output
        torch.testing.assert_close(down(activations), mlp)  # neuron activations read out = MLP output


@pytest.mark.parametrize("family", FAMILIES)
def test_all_heads_and_all_neurons_equal_the_whole_module_when_the_readout_is_shared(family, tmp_path):
    """Heads are slices of the head-output module's input and neurons of the neuron-activation
    module's input: with the base's read-out weights in the specialized model, patching every head
    (every neuron) of a layer equals patching the whole attention (MLP) output."""
    base = tiny_model(family)
    sft = perturbed_copy(base, 0.2)
    space = ComponentSpace.from_model(base)
    for name in ("L1.attn.head0", "L1.mlp.neuron0"):
        module = space.site(name).module
        sft.get_submodule(module).load_state_dict(base.get_submodule(module).state_dict())
    pair = load_pair(save(base, tmp_path / "b"), save(sft, tmp_path / "s"))
    batch = encode(pair.tokenizer, tiny_texts(3, 1))
    heads = [f"L1.attn.head{h}" for h in range(pair.space.num_heads)]
    neurons = [f"L1.mlp.neuron{j}" for j in range(pair.space.num_neurons(1))]
    whole_attn = patched_residual(pair, batch, ["L1.attn"], 1)
    torch.testing.assert_close(patched_residual(pair, batch, heads, 1), whole_attn)
    torch.testing.assert_close(patched_residual(pair, batch, neurons, 1), patched_residual(pair, batch, ["L1.mlp"], 1))
    assert not torch.allclose(patched_residual(pair, batch, heads[:1], 1), whole_attn)
