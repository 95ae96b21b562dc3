import pytest
import torch

from conftest import make_pair, perturbed_copy, save, tiny_model, tiny_texts
from weightpatch.activation import ActivationScreen, activation_scores, patched_residual, site_of
from weightpatch.anchors import build_anchor
from weightpatch.errors import ComponentError
from weightpatch.pair import load_pair
from weightpatch.runner import encode, run_segment
from weightpatch.scoring import AnchorScorer

ADDITIVE = ["llama", "gpt2", "gpt_neox"]  # residual = input + attn + mlp outputs exactly (no post-norms)


def _sft_residual(pair, batch, layer):
    with pair.as_model("specialized") as m, torch.no_grad():
        return run_segment(m, pair.space, batch, stop=layer)[0].clone()


@pytest.mark.parametrize("family", ADDITIVE)
def test_patching_every_output_of_a_layer_reproduces_the_specialized_residual(family, tmp_path):
    pair = load_pair(*make_pair(family, tmp_path, scale=0.2))
    batch = encode(pair.tokenizer, tiny_texts(4, 3))
    for layer in (0, 1):
        ref = _sft_residual(pair, batch, layer)
        assert torch.allclose(patched_residual(pair, batch, [f"L{layer}"], layer), ref)
        # the block's own input, attention and MLP outputs (and those of every block below)
        parts = ["embed", *(f"L{i}.{m}" for i in range(layer + 1) for m in ("attn", "mlp"))]
        assert torch.allclose(patched_residual(pair, batch, parts, layer), ref, atol=1e-5)
        assert not torch.allclose(patched_residual(pair, batch, parts[:-1], layer), ref, atol=1e-5)


def test_scores_are_normalized_like_weight_patching_and_batching_changes_nothing(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(8, 5), batch_size=3)
    components = ["L0", "L0.attn", "L0.mlp", "L1", "L1.attn.head2", "L0.mlp.neuron5", "L2", "L2.attn.head0"]
    table = activation_scores(scorer, components, variants_per_batch=3)
    scores = dict(zip(table.frame["component"], table.frame["score"], strict=True))
    assert set(table.frame["method"]) == {"activation"} and table.components() == components
    assert scores["L1"] == pytest.approx(1.0, abs=1e-6)  # the anchor layer's whole residual
    assert scores["L2"] == 0.0 and scores["L2.attn.head0"] == 0.0  # above the anchor
    screen = ActivationScreen(scorer)
    for name in ("L0.attn", "L1.attn.head2", "L0.mlp.neuron5"):
        alone = screen.effect_of([name])
        assert scores[name] == pytest.approx(alone.mean, abs=1e-6)
    # patching only the last token of the anchor layer is enough to recover it
    last = ActivationScreen(scorer, positions="last").effect_of(["L1"])
    assert last.mean == pytest.approx(1.0, abs=1e-6)
    assert abs(ActivationScreen(scorer, positions="last").effect_of(["L0"]).mean - scores["L0"]) > 0


def test_default_components_cover_blocks_modules_heads_neurons(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 5))
    table = activation_scores(scorer)
    counts = table.frame["kind"].value_counts().to_dict()
    n = pair.space.num_layers
    assert counts == {"layer": n, "module": 2 * n, "head": 4 * n, "neuron": 48 * n}
    assert table.frame["score"].notna().all()


def test_components_without_an_activation_site_are_refused(tmp_path):
    base = tiny_model("gpt2")
    pair = load_pair(save(base, tmp_path / "b"), save(perturbed_copy(base), tmp_path / "s"))
    with pytest.raises(ComponentError, match="fused"):
        site_of(pair.space, "L0.attn.q")  # a column slice of GPT-2's fused c_attn
    with pytest.raises(ComponentError, match="activation site"):
        site_of(pair.space, "unembed")
    assert site_of(pair.space, "L0.attn.head1").start == 8


def test_defaults_patch_every_position_and_list_every_kind_below_each_layer(llama_pair_dirs):
    from weightpatch.activation import default_components

    pair = load_pair(*llama_pair_dirs)
    space = pair.space
    heads = default_components(space, kinds=("head",))
    assert heads and {c.kind for c in heads} == {"head"} and {c.layer for c in heads} == {0, 1, 2}
    assert {c.layer for c in default_components(space, kinds=("module",), layers=[1])} == {1}
    assert [c.name for c in default_components(space, kinds=("module",), modules=("mlp",), layers=[0])] == ["L0.mlp"]
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 3))
    components = ["L0.attn", "L0.mlp.neuron2", "L1.attn.head1", "L2.mlp", "L2.attn"]  # two above the anchor
    default = activation_scores(scorer, components).frame.set_index("component")
    every = activation_scores(scorer, components, positions="all").frame.set_index("component")
    last = activation_scores(scorer, components, positions="last").frame.set_index("component")
    assert default["score"].equals(every["score"]) and not default["score"].equals(last["score"])
    # above the anchor block nothing can move the anchor: score 0 with no spread, every such row present
    assert default.loc[["L2.mlp", "L2.attn"], ["score", "stderr"]].eq(0.0).all().all()
    low = AnchorScorer(pair, build_anchor(pair, tiny_texts(6), None, layer=0, method="model_diff"), tiny_texts(6, 3))
    above = activation_scores(low, ["L1.mlp", "L2.mlp", "L0.mlp"]).frame.set_index("component")
    assert above.loc[["L1.mlp", "L2.mlp"], "score"].eq(0.0).all() and above.loc["L0.mlp", "score"] != 0.0
    ids = encode(pair.tokenizer, tiny_texts(3, 3))
    assert torch.equal(
        patched_residual(pair, ids, ["L0.attn"], layer=1),
        patched_residual(pair, ids, ["L0.attn"], layer=1, positions="all"),
    )
    assert not torch.equal(
        patched_residual(pair, ids, ["L0.attn"], layer=1),
        patched_residual(pair, ids, ["L0.attn"], layer=1, positions="last"),
    )


def test_a_specialized_receiver_takes_its_activations_from_the_base(llama_pair_dirs):
    """The donor is the other model whichever is in memory: patching a whole layer's residual into the
    specialized receiver gives the base residual, and the anchor layer's block scores 1 either way."""
    base_pair = load_pair(*llama_pair_dirs)
    sft_pair = load_pair(*llama_pair_dirs, receiver="specialized")
    batch = encode(sft_pair.tokenizer, tiny_texts(4, 3))
    with torch.no_grad():
        base_residual = run_segment(base_pair.model, base_pair.space, batch, stop=1)[0]
    assert torch.allclose(patched_residual(sft_pair, batch, ["L1"], 1), base_residual, atol=1e-6)
    anchor = build_anchor(base_pair, tiny_texts(6), None, layer=1, method="model_diff")
    scorer = AnchorScorer(sft_pair, anchor, tiny_texts(6, 5))
    screen = ActivationScreen(scorer)
    assert screen.effect_of(["L1"]).mean == pytest.approx(1.0, abs=1e-6)
    assert screen.effect_of(["L2.mlp"]).mean == 0.0  # above the anchor: nothing to patch


def test_the_embedding_output_is_patched_before_block_0(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 5), batch_size=16)
    score = activation_scores(scorer, ["embed"]).frame["score"].item()
    (batch,) = scorer.batches
    f = scorer.project(patched_residual(pair, batch, ["embed"], 1))  # the whole forward, embedding swapped
    by_hand = float(((f - scorer.f_receiver) / scorer.gap)[scorer.valid].double().mean())
    assert score == pytest.approx(by_hand, abs=1e-6) and abs(score) > 1e-3


@pytest.mark.parametrize("positions", ["all", "last"])
def test_sites_inside_the_anchor_block_equal_a_full_forward(llama_pair_dirs, positions):
    """The scores run the anchor block on its last position only; patching sites inside that block
    (its MLP output, a neuron, a head, the attention output, the whole block) must give what a full
    run of the block gives: the effect computed from ``patched_residual``'s last position."""
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(7, 5), batch_size=3)
    components = ["L1.mlp", "L1.mlp.neuron5", "L1.attn.head2", "L1.attn", "L1", "L0.mlp"]
    table = activation_scores(scorer, components, positions=positions, variants_per_batch=4).frame.set_index(
        "component"
    )
    for name in components:
        f = torch.cat(
            [scorer.project(patched_residual(pair, b, [name], layer=1, positions=positions)) for b in scorer.batches]
        )
        ratios = ((f - scorer.f_receiver) / scorer.gap)[scorer.valid].double()
        assert table.loc[name, "score"] == pytest.approx(float(ratios.mean()), rel=1e-5, abs=1e-7), name
    assert table["score"].abs().min() > 1e-3
