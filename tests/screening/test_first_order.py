import numpy as np
import pytest

from conftest import make_pair, tiny_texts
from weightpatch.anchors import build_anchor
from weightpatch.pair import load_pair
from weightpatch.patch import patched
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.first_order import gradient_scores


@pytest.fixture(scope="module")
def scorer64(tmp_path_factory):
    pair = load_pair(*make_pair("qwen2", tmp_path_factory.mktemp("q"), scale=0.05), dtype="float64")
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    return AnchorScorer(pair, anchor, tiny_texts(6, 7), batch_size=4, min_relative_gap=0.0)


@pytest.mark.parametrize("component", ["L0.mlp", "L1.attn.head2", "L0.mlp.neuron7", "L2", "embed", "L1.attn.q"])
def test_first_order_matches_finite_difference(scorer64, component):
    pair = scorer64.pair
    score = gradient_scores(scorer64, components=[component], progress=False).frame["score"].item()
    # central difference along the delta (RMSNorm and RoPE compute in float32 internally, so eps
    # cannot be tiny; the O(eps^2) error of a central difference is far below the tolerance)
    eps = 1e-3
    moved = []
    for alpha in (eps, -eps):
        with patched(pair.model, pair.donor, pair.space, [component], alpha=alpha):
            moved.append(scorer64.effect(scorer64.anchor_scores(pair.model)).mean)
    fd = (moved[0] - moved[1]) / (2 * eps)
    assert abs(fd) > 1e-5
    assert score == pytest.approx(fd, rel=2e-3)


def test_one_pass_scores_every_kind_consistently(scorer64):
    table = gradient_scores(scorer64, progress=False)
    pair = scorer64.pair
    assert set(table.frame["kind"]) == {"layer", "module", "head", "neuron"}
    assert len(table) == len(list(pair.space.components()))
    s = table.frame.set_index("component")["score"]
    # first-order scores are linear in the delta: a layer is the sum of its disjoint parts
    neurons = s[[f"L1.mlp.neuron{j}" for j in range(pair.space.num_neurons(1))]].sum()
    assert neurons == pytest.approx(s["L1.mlp"], rel=1e-9)
    heads = s[[f"L1.attn.head{h}" for h in range(4)]].sum()
    assert heads == pytest.approx(s["L1.attn.q"] + s["L1.attn.o"], rel=1e-9)
    parts = ["L1.attn", "L1.mlp", "L1.norm.pre_attn", "L1.norm.pre_mlp"]
    assert s[parts].sum() == pytest.approx(s["L1"], rel=1e-9)


def test_integrated_gradients_completeness(scorer64):
    pair = scorer64.pair
    partition = pair.space.everything()
    table = gradient_scores(scorer64, components=partition, steps=24, progress=False)
    assert table.frame["method"].eq("integrated_gradients").all()
    # normalized per prompt by its gap, the whole gap is 1 per prompt
    assert table.frame["score"].sum() == pytest.approx(1.0, abs=2e-3)
    first = gradient_scores(scorer64, components=partition, progress=False)
    assert abs(first.frame["score"].sum() - 1.0) > abs(table.frame["score"].sum() - 1.0)


def test_first_order_stderr_is_the_spread_of_single_prompt_scores(scorer64):
    """The per-prompt stderr equals std/sqrt(n) of the scores of each prompt scored alone, and the
    score equals the one-backward-per-batch score."""
    import numpy as np

    components = ["L0.mlp", "L1.attn.head2", "L0.mlp.neuron7"]
    table = gradient_scores(scorer64, components=components, progress=False).frame.set_index("component")
    batched = gradient_scores(scorer64, components=components, progress=False, per_prompt=False)
    assert batched.frame["stderr"].isna().all()
    # equal up to rounding (the norms compute in float32 inside)
    np.testing.assert_allclose(batched.frame.set_index("component")["score"], table["score"], rtol=1e-6)
    single = [
        gradient_scores(
            AnchorScorer(scorer64.pair, scorer64.anchor, [text], min_relative_gap=0.0),
            components=components,
            progress=False,
        ).frame.set_index("component")["score"]
        for text in scorer64.texts
    ]
    per_prompt = np.stack([s[components].to_numpy() for s in single])  # (prompt, component)
    n = len(scorer64.texts)
    np.testing.assert_allclose(table.loc[components, "score"], per_prompt.mean(0), rtol=1e-6)
    np.testing.assert_allclose(table.loc[components, "stderr"], per_prompt.std(0, ddof=1) / np.sqrt(n), rtol=1e-5)
    assert (table["n_prompts"] == n).all()


def test_two_steps_are_integrated_gradients_at_the_quarter_points(scorer64):
    components = ["L0.mlp", "L1.attn"]
    first = gradient_scores(scorer64, components=components, progress=False).frame.set_index("component")
    two = gradient_scores(scorer64, components=components, steps=2, progress=False).frame.set_index("component")
    assert set(first["method"]) == {"first_order"} and set(two["method"]) == {"integrated_gradients"}
    assert not np.allclose(first["score"], two["score"], rtol=1e-6)  # the path is sampled at 1/4 and 3/4, not 0


def test_first_order_stderr_of_two_prompts_is_half_their_difference(scorer64):
    """The smallest sample with a spread: two kept prompts give stderr |v0 - v1| / 2 (std with ddof 1
    over sqrt 2), each v scored alone."""
    texts = scorer64.texts[:2]
    two = gradient_scores(
        AnchorScorer(scorer64.pair, scorer64.anchor, texts, min_relative_gap=0.0), components=["L0.mlp"], progress=False
    ).frame
    single = [
        gradient_scores(
            AnchorScorer(scorer64.pair, scorer64.anchor, [text], min_relative_gap=0.0),
            components=["L0.mlp"],
            progress=False,
        ).frame
        for text in texts
    ]
    v0, v1 = (s["score"].item() for s in single)
    assert np.isnan(single[0]["stderr"].item())  # one prompt has no spread
    assert two["n_prompts"].item() == 2 and abs(v0 - v1) > 1e-6
    assert two["stderr"].item() == pytest.approx(abs(v0 - v1) / 2, rel=1e-6)
