"""A mixture-of-experts family (Qwen3-MoE) described as data: router, experts and dense layers.

transformers 5 holds the experts as fused 3-D tensors in memory (``mlp.experts.gate_up_proj``
[experts, 2*moe_intermediate, hidden]) while checkpoints store one tensor per expert; the lazy
donor reads the fused slices from the per-expert tensors.
"""

import re

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from conftest import VOCAB, perturbed_copy, save, tiny_texts, token_batch
from weightpatch.activation import capturing, patched_residual
from weightpatch.anchors import build_anchor
from weightpatch.components import Component, ComponentSpace, ParamSlice, merge_slices
from weightpatch.errors import ComponentError
from weightpatch.pair import load_pair
from weightpatch.patch import patched
from weightpatch.runner import encode
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen, plain_exact_scores
from weightpatch.screening.first_order import gradient_scores
from weightpatch.weights import FusedExpertSource


def tiny_moe(seed: int = 0) -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        mlp_only_layers=[2],  # block 2 keeps a dense MLP
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    base = tiny_moe()
    return save(base, root / "base"), save(perturbed_copy(base, 0.2), root / "sft")


def test_vocabulary_router_experts_and_dense_layers():
    space = ComponentSpace.from_model(tiny_moe())
    assert space.uncovered_parameters() == []
    assert space.num_experts(1) == 4 and space.num_neurons(1) == 0  # sparse block
    assert space.num_experts(2) == 0 and space.num_neurons(2) == 48  # dense block
    names = [c.name for c in space.components(layers=[1])]
    assert {"L1.mlp.router", "L1.mlp.experts", "L1.mlp.expert0", "L1.mlp.expert3"} <= set(names)
    assert not any(n.startswith("L1.mlp.neuron") for n in names) and "L1.mlp.expert3.neuron15" in names
    for name in names:
        assert Component.parse(name).name == name and space.resolve(name)
    assert space.resolve("L1.mlp.expert2") == [
        ParamSlice("model.layers.1.mlp.experts.gate_up_proj", 0, ((2, 3),)),
        ParamSlice("model.layers.1.mlp.experts.down_proj", 0, ((2, 3),)),
    ]
    assert space.resolve("L1.mlp.router") == [ParamSlice("model.layers.1.mlp.gate.weight")]
    experts = space.resolve_all(space.components(kinds=("expert",), layers=[1]))
    assert experts == [  # the experts tile the fused tensors
        ParamSlice("model.layers.1.mlp.experts.gate_up_proj", 0, ((0, 4),)),
        ParamSlice("model.layers.1.mlp.experts.down_proj", 0, ((0, 4),)),
    ]
    with pytest.raises(ComponentError, match=r"expert 4 is out of range \(layer 1 has 4 experts\)"):
        space.parse("L1.mlp.expert4")
    with pytest.raises(ComponentError, match="expert 0 is out of range"):
        space.parse("L2.mlp.expert0")  # the dense block has no experts
    with pytest.raises(ComponentError, match="fused experts compute every expert inside one module"):
        space.site("L1.mlp.expert0")


def test_the_lazy_donor_reads_fused_expert_slices_from_per_expert_tensors(moe_dirs):
    pair = load_pair(*moe_dirs)
    assert isinstance(pair.donor, FusedExpertSource)
    sft = AutoModelForCausalLM.from_pretrained(moe_dirs[1], dtype=torch.float32)
    fused = sft.get_parameter("model.layers.1.mlp.experts.gate_up_proj").detach()
    reads: list[str] = []
    inner_read = pair.donor.inner.read
    pair.donor.inner.read = lambda piece: reads.append(piece.name) or inner_read(piece)  # type: ignore[method-assign]
    (gate_up, down) = pair.space.resolve("L1.mlp.expert2")
    assert torch.equal(pair.donor.read(gate_up), fused[2:3])
    assert reads == ["model.layers.1.mlp.experts.2.gate_proj.weight", "model.layers.1.mlp.experts.2.up_proj.weight"]
    reads.clear()
    assert torch.equal(pair.donor.read(down), sft.get_parameter("model.layers.1.mlp.experts.down_proj")[2:3])
    assert reads == ["model.layers.1.mlp.experts.2.down_proj.weight"]
    assert pair.donor.shape("model.layers.1.mlp.experts.gate_up_proj") == (4, 32, 32)


def test_patching_everything_gives_the_specialized_logits_and_one_expert_only_its_slab(moe_dirs):
    pair = load_pair(*moe_dirs)
    sft = AutoModelForCausalLM.from_pretrained(moe_dirs[1], dtype=torch.float32).eval()
    ids = token_batch()
    with torch.no_grad():
        base_logits, sft_logits = pair.model(ids).logits, sft(ids).logits
        with patched(pair.model, pair.donor, pair.space, pair.space.everything()):
            assert torch.equal(pair.model(ids).logits, sft_logits)
        with patched(pair.model, pair.donor, pair.space, []):
            assert torch.equal(pair.model(ids).logits, base_logits)
        name = "model.layers.1.mlp.experts.down_proj"
        before = pair.model.get_parameter(name).detach().clone()
        with patched(pair.model, pair.donor, pair.space, ["L1.mlp.expert2"]):
            after = pair.model.get_parameter(name).detach()
            assert torch.equal(after[2], sft.get_parameter(name)[2])
            assert torch.equal(after[[0, 1, 3]], before[[0, 1, 3]])


def test_truncated_exact_path_equals_plain_full_forward(moe_dirs):
    pair = load_pair(*moe_dirs)
    anchor = build_anchor(pair, tiny_texts(6, length=9), None, layer=3, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 4, length=9), batch_size=4, min_relative_gap=0.0)
    components = ["L0", "L1", "L1.mlp", "L1.mlp.router", "L1.mlp.experts", "L1.attn.head1", "L2.mlp.neuron3"]
    components += [f"L1.mlp.expert{e}" for e in range(4)] + ["L1.mlp.expert2.neuron3", "L0.mlp.expert0.neuron15"]
    fast = ExactScreen(scorer, variants_per_batch=3).run(components, progress=False).frame.set_index("component")
    plain = plain_exact_scores(scorer, components).frame.set_index("component")
    assert fast.loc[[f"L1.mlp.expert{e}" for e in range(4)], "score"].abs().min() > 0
    torch.testing.assert_close(
        torch.tensor(fast.loc[plain.index, "score"].values), torch.tensor(plain["score"].values), atol=2e-4, rtol=1e-3
    )


def test_the_router_site_is_the_router_logits():
    model = tiny_moe()
    space = ComponentSpace.from_model(model)
    site = space.site("L1.mlp.router")
    store: dict = {}
    with torch.no_grad(), capturing(model, [site], store):
        out = model(token_batch(n=2, length=5), output_router_logits=True)
    assert site.module == "model.layers.1.mlp.gate"
    torch.testing.assert_close(store[site.key], out.router_logits[1])  # (batch*seq, experts)
    assert store[site.key].shape == (10, 4)


def test_router_logits_are_observed_not_activation_patched(moe_dirs):
    pair = load_pair(*moe_dirs)
    batch = encode(pair.tokenizer, tiny_texts(2))
    with pytest.raises(ComponentError, match=r"L1.mlp.router cannot be activation-patched: .* patch the whole MLP"):
        patched_residual(pair, batch, ["L1.mlp.router"], 1)
    assert patched_residual(pair, batch, ["L1.mlp"], 1).shape[-1] == 32


def _mask(shape, pieces) -> torch.Tensor:
    """Boolean mask of the entries a list of slices of one tensor covers."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for p in pieces:
        region = p.region(mask)
        for a, b in p.ranges:
            region.narrow(p.dim, a, b - a).fill_(True)
    return mask


def test_expert_neurons_are_rows_and_columns_inside_one_expert_and_tile_it():
    """Neuron j of expert e: gate row j and up row 16 + j of gate_up_proj[e], column j of
    down_proj[e]; the 16 neurons of an expert tile its slab, which absorbs them in a union."""
    space = ComponentSpace.from_model(tiny_moe())
    assert space.num_expert_neurons(1) == 16 and space.num_expert_neurons(2) == 0
    c = space.parse("L1.mlp.expert2.neuron3")
    assert (c.kind, c.expert, c.index, c.name) == ("expert_neuron", 2, 3, "L1.mlp.expert2.neuron3")
    gate_up, down = "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"
    assert space.resolve(c) == [ParamSlice(gate_up, 1, ((3, 4), (19, 20)), 2), ParamSlice(down, 2, ((3, 4),), 2)]
    neurons = [n for n in space.components(kinds=("expert_neuron",), layers=[1]) if n.expert == 2]
    assert len(neurons) == 16 and len(list(space.components(kinds=("expert_neuron",), layers=[1]))) == 64
    pieces = space.resolve_all(neurons)
    for name in (gate_up, down):
        covered = _mask(space.shapes[name], [p for p in pieces if p.name == name])
        expected = torch.zeros(space.shapes[name], dtype=torch.bool)
        expected[2] = True
        assert torch.equal(covered, expected)
    assert merge_slices([*space.resolve("L1.mlp.expert2"), *pieces]) == space.resolve("L1.mlp.expert2")
    with pytest.raises(ComponentError, match=r"neuron 16 is out of range \(the experts of layer 1 have 16"):
        space.parse("L1.mlp.expert2.neuron16")
    with pytest.raises(ComponentError, match="expert 7 is out of range"):
        space.parse("L1.mlp.expert7.neuron0")


def test_patching_an_expert_neuron_changes_exactly_its_entries_reading_one_expert(moe_dirs):
    pair = load_pair(*moe_dirs)
    sft = AutoModelForCausalLM.from_pretrained(moe_dirs[1], dtype=torch.float32)
    reads: list[str] = []
    inner_read = pair.donor.inner.read
    pair.donor.inner.read = lambda piece: reads.append(piece.name) or inner_read(piece)  # type: ignore[method-assign]
    before = {n: p.detach().clone() for n, p in pair.model.named_parameters()}
    owned = {s.name: s for s in pair.space.resolve("L1.mlp.expert2.neuron3")}
    with patched(pair.model, pair.donor, pair.space, ["L1.mlp.expert2.neuron3"]):
        for name, p in pair.model.named_parameters():
            changed = p != before[name]
            if name not in owned:
                assert not changed.any(), name
                continue
            expected = _mask(p.shape, [owned[name]])
            assert torch.equal(changed, expected), name
            assert torch.equal(p[expected], sft.get_parameter(name)[expected])
    assert all(".experts.2." in r for r in reads)
    assert all(torch.equal(p, before[n]) for n, p in pair.model.named_parameters())


def test_first_order_scores_of_an_experts_neurons_add_up_to_the_expert(moe_dirs):
    """grad * delta is additive over disjoint slices: the 16 neurons of an expert tile its slab."""
    pair = load_pair(*moe_dirs)
    anchor = build_anchor(pair, tiny_texts(6, length=9), None, layer=3, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 4, length=9), batch_size=6, min_relative_gap=0.0)
    neurons = [f"L1.mlp.expert1.neuron{j}" for j in range(16)]
    table = gradient_scores(scorer, components=["L1.mlp.expert1", "L1.mlp.expert0", *neurons], progress=False)
    scores = table.frame.set_index("component")["score"]
    assert scores["L1.mlp.expert1"] != 0
    assert scores[neurons].sum() == pytest.approx(scores["L1.mlp.expert1"], rel=1e-9, abs=1e-12)
    assert scores[neurons].sum() != pytest.approx(scores["L1.mlp.expert0"])


def test_expert_names_out_of_range_sites_and_readout_refusals():
    """Messages in full: an expert index equal to the count is out of range (for experts and for
    neurons inside them), the suggestion is a name that exists in that layer (a mixture-of-experts
    layer has no dense neuron to suggest), expert neurons have no activation site, and a layer
    without dense neurons has no neuron readout."""
    space = ComponentSpace.from_model(tiny_moe())
    assert (space.num_experts(1), space.num_expert_neurons(1), space.num_neurons(1)) == (4, 16, 0)
    cases = {
        "L1.mlp.expert4.neuron0": "expert 4 is out of range (layer 1 has 4 experts); "
        "did you mean 'L1.mlp.expert0.neuron0'?",
        "L1.mlp.expert3.neuron16": "neuron 16 is out of range (the experts of layer 1 have 16 neurons); "
        "did you mean 'L1.mlp.expert0.neuron0'?",
        "L1.mlp.neuron3": "neuron 3 is out of range (layer 1 has 0 neurons); did you mean 'L1.mlp.expert0.neuron0'?",
        "L1.atn": "no module 'atn' in layer 1; did you mean 'L1.attn'?",  # the layer's modules stay candidates
    }
    for name, problem in cases.items():
        with pytest.raises(ComponentError, match="^" + re.escape(f"unknown component {name!r}: {problem}") + "$"):
            space.validate(name)
    with pytest.raises(
        ComponentError,
        match=r"^L1\.mlp\.expert0\.neuron1 has no activation site: fused experts compute every expert inside one "
        r"module; patch the whole 'L1\.mlp' or the router 'L1\.mlp\.router'$",
    ):
        space.site("L1.mlp.expert0.neuron1")
    with pytest.raises(ComponentError, match=r"^layer 1 of this qwen3_moe model has no dense MLP neurons$"):
        space.neuron_readout(1)
    assert space.neuron_readout(2) == ("model.layers.2.mlp.down_proj.weight", 1)  # the dense block
