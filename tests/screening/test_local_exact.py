import pytest
import torch

from conftest import make_pair, perturbed_copy, save, tiny_model, tiny_texts
from weightpatch.anchors import build_anchor
from weightpatch.errors import WeightPatchError
from weightpatch.pair import load_pair
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen
from weightpatch.screening.first_order import gradient_scores
from weightpatch.screening.local_exact import local_exact_scores


def _scores(table, names: list[str]) -> torch.Tensor:
    """The table's scores in the order of ``names`` (the exact screen sorts by layer)."""
    return torch.tensor(table.frame.set_index("component").loc[names, "score"].values, dtype=torch.float64)


def _scorer(pair, anchor_layer: int) -> AnchorScorer:
    anchor = build_anchor(pair, tiny_texts(6, length=9), None, layer=anchor_layer, method="model_diff")
    return AnchorScorer(pair, anchor, tiny_texts(6, 4, length=9), batch_size=4, min_relative_gap=0.0)


def test_equals_exact_when_the_blocks_above_are_identity(tmp_path):
    """Receiver blocks 1 and 2 have zero attention and MLP output projections, so each is the
    identity map of the residual stream: above any patched block everything is linear and the
    local-exact score is the exact score, for every kind (neurons through the neuron path)."""
    base = tiny_model("llama")
    donor = perturbed_copy(base, 0.05)  # the donor's upper blocks are not identity
    with torch.no_grad():
        for layer in (1, 2):
            base.model.layers[layer].self_attn.o_proj.weight.zero_()
            base.model.layers[layer].mlp.down_proj.weight.zero_()
    pair = load_pair(save(base, tmp_path / "base"), save(donor, tmp_path / "sft"), dtype="float64")
    scorer = _scorer(pair, anchor_layer=2)
    components = list(pair.space.components())
    local = local_exact_scores(scorer, components=components, progress=False)
    exact = ExactScreen(scorer).run(components, progress=False)
    assert local.frame["method"].eq("local_exact").all()
    names = [c.name for c in components]
    assert local.components() == names  # in the order given
    assert _scores(exact, names).abs().max() > 0.05
    torch.testing.assert_close(_scores(local, names), _scores(exact, names), atol=1e-10, rtol=1e-8)
    assert set(local.frame["n_prompts"]) == set(exact.frame["n_prompts"]) == {scorer.valid.sum().item()}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_exact_for_components_of_the_anchor_block(family, tmp_path):
    pair = load_pair(*make_pair(family, tmp_path, scale=0.2))
    scorer = _scorer(pair, anchor_layer=1)
    names = [c.name for c in pair.space.components(layers=[1])] + ["norm.final", "L2.attn.head0", "L2.mlp.neuron3"]
    local = local_exact_scores(scorer, components=names, progress=False)
    exact = ExactScreen(scorer).run(names, progress=False)
    assert _scores(exact, names).abs().max() > 0.05
    torch.testing.assert_close(_scores(local, names), _scores(exact, names), atol=2e-6, rtol=1e-5)
    # below the anchor block 1 is nonlinear, and the estimate is not the exact score, unless block 1
    # runs exactly too
    below = ["embed", "L0", "L0.attn", "L0.mlp", "L0.attn.head1"]
    exact_below = _scores(ExactScreen(scorer).run(below, progress=False), below)
    local_below = _scores(local_exact_scores(scorer, components=below, progress=False), below)
    assert (local_below - exact_below).abs().max() > 1e-4
    two_blocks = _scores(local_exact_scores(scorer, components=below, exact_blocks=2, progress=False), below)
    torch.testing.assert_close(two_blocks, exact_below, atol=2e-6, rtol=1e-5)


def test_exact_blocks_must_include_the_own_block(llama_pair_dirs):
    scorer = _scorer(load_pair(*llama_pair_dirs), anchor_layer=1)
    with pytest.raises(WeightPatchError, match="exact_blocks must be at least 1"):
        local_exact_scores(scorer, components=["L0.mlp"], exact_blocks=0)


def _scaled_pair(tmp_path, scale: float):
    """GPT-2 (LayerNorm and softmax in the model dtype) in float64, donor = base + scale * delta."""
    base = tiny_model("gpt2")
    donor = perturbed_copy(base, 0.05)
    with torch.no_grad():
        for p_base, p_donor in zip(base.parameters(), donor.parameters(), strict=True):
            p_donor.copy_(p_base + scale * (p_donor - p_base))
    return load_pair(save(base, tmp_path / f"base{scale}"), save(donor, tmp_path / f"sft{scale}"), dtype="float64")


def test_equals_first_order_to_first_order_in_the_delta(tmp_path):
    """Both estimates equal the exact score to first order in the delta, so their difference
    (relative to the scores, which are O(1) fractions of an O(delta) gap) shrinks linearly."""
    errors = {}
    for scale in (1e-2, 1e-3):
        pair = _scaled_pair(tmp_path, scale)
        scorer = _scorer(pair, anchor_layer=2)
        components = [
            "embed",
            *pair.space.components(kinds=("layer", "module", "head"), layers=[0, 1, 2]),
            "L0.mlp.neuron5",
            "L1.mlp.neuron17",
        ]
        names = [str(c) for c in components]
        local = _scores(local_exact_scores(scorer, components=names, progress=False), names)
        first = _scores(gradient_scores(scorer, components=names, progress=False), names)
        errors[scale] = float((local - first).abs().max() / first.abs().max())
    assert errors[1e-3] < 1e-3
    assert 5 < errors[1e-2] / errors[1e-3] < 20
