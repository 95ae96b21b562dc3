"""First-order scores against an independent reference on every family: a central finite difference
of the exact effect along the component's delta, ``(E(alpha=+eps) - E(alpha=-eps)) / (2 eps)``.

The components cover each reduction path of ``plan_reduction``: whole tensors (a layer), one range
per parameter (a head, a neuron) and several ranges of one parameter (GPT-NeoX's fused
``query_key_value``: ``L1.attn.q`` owns one block of ``head_dim`` rows per head). The scorer uses the
real default tiny-gap rule with one prompt's gap forced to ~0, so the first-order weights must be
divided by the kept prompts, as the exact effect is.
"""

import pytest

from conftest import FAMILIES, make_pair, tiny_texts
from weightpatch.anchors import Anchor, build_anchor, last_token_residuals
from weightpatch.pair import load_pair
from weightpatch.patch import patched
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.first_order import gradient_scores

ANCHOR_LAYER = 2
COMPONENTS = ["L0", "L1.attn.q", "L1.attn.head1", "L0.mlp.neuron3", "L1.mlp"]


def equal_length_texts(n: int, seed: int) -> list[str]:
    """Prompts of four characters each: no padding. (Gemma2's eager attention in float64 turns
    left-padded rows into NaN, a fully masked softmax row times a zero probability.)"""
    return [" ".join(t.split()[:4]) for t in tiny_texts(n, seed)]


def scorer_excluding_one_prompt(pair, texts: list[str], batch_size: int = 3) -> AnchorScorer:
    """A scorer at the default ``min_relative_gap`` whose anchor is orthogonal to prompt 0's
    specialized-minus-base residual difference, so prompt 0's gap is ~0 and it is excluded."""
    anchor = build_anchor(pair, equal_length_texts(6, 0), None, layer=ANCHOR_LAYER, method="model_diff")
    diff = (
        last_token_residuals(pair, texts[:1], [ANCHOR_LAYER], "specialized")
        - last_token_residuals(pair, texts[:1], [ANCHOR_LAYER], "base")
    )[0, 0].double()
    u = anchor.vector.double()
    u = u - (u @ diff) / (diff @ diff) * diff
    orthogonal = Anchor((u / u.norm()).float(), anchor.layer, anchor.method, anchor.models, anchor.prompts_sha256)
    scorer = AnchorScorer(pair, orthogonal, texts, batch_size=batch_size)  # default min_relative_gap
    # float32 storage of u leaves prompt 0's gap at rounding level, far below 0.1 * median
    assert not scorer.valid[0] and scorer.n_excluded >= 1
    return scorer


@pytest.fixture(scope="module", params=FAMILIES)
def scorer64(request, tmp_path_factory):
    pair = load_pair(*make_pair(request.param, tmp_path_factory.mktemp(request.param), scale=0.1), dtype="float64")
    return scorer_excluding_one_prompt(pair, equal_length_texts(7, 7))


def finite_difference(scorer: AnchorScorer, component: str, eps: float = 1e-3) -> float:
    pair = scorer.pair
    moved = []
    for alpha in (eps, -eps):
        with patched(pair.model, pair.donor, pair.space, [component], alpha=alpha):
            moved.append(scorer.effect(scorer.anchor_scores(pair.model)).mean)
    return (moved[0] - moved[1]) / (2 * eps)


def test_first_order_equals_finite_difference_on_every_reduction_path(scorer64):
    table = gradient_scores(scorer64, components=COMPONENTS, progress=False).frame.set_index("component")
    for component in COMPONENTS:
        fd = finite_difference(scorer64, component)
        assert abs(fd) > 1e-5, component  # the component really moves the anchor
        # RMSNorm/RoPE compute in float32 internally in some families: the tolerance (measured
        # error <= 7e-3 relative, 4e-6 absolute) is far below the effect of dropping a range or a
        # prompt (one of 6 kept prompts: 1/7 relative)
        assert table.loc[component, "score"] == pytest.approx(fd, rel=2e-2, abs=1e-6), component
    assert (table["n_prompts"] == int(scorer64.valid.sum())).all()


def test_gpt_neox_query_is_a_multi_range_slice(tmp_path):
    """The test above exercises the several-ranges path only if ``L1.attn.q`` really is one."""
    pair = load_pair(*make_pair("gpt_neox", tmp_path))
    head_dim = 32 // 4
    query_rows = tuple((h * 3 * head_dim, h * 3 * head_dim + head_dim) for h in range(4))
    prefix = "gpt_neox.layers.1.attention.query_key_value."
    assert {(s.name, s.dim, s.ranges) for s in pair.space.resolve("L1.attn.q")} == {
        (prefix + "weight", 0, query_rows),
        (prefix + "bias", 0, query_rows),
    }


def test_several_ranges_along_a_later_dim(tmp_path):
    """GPT-2 stores q, k and v in one Conv1D weight (in, 3 * hidden): with keys and values a head owns
    three column ranges of it, a several-ranges slice along dim 1, whose reduction must sum over the
    rows, not slice them. First order equals the finite difference there too."""
    pair = load_pair(*make_pair("gpt2", tmp_path, scale=0.1), dtype="float64", include_kv=True)
    hidden, head_dim = 32, 32 // 4
    columns = tuple((part * hidden + head_dim, part * hidden + 2 * head_dim) for part in range(3))
    slices = {(s.name, s.dim, s.ranges) for s in pair.space.resolve("L1.attn.head1")}
    assert ("transformer.h.1.attn.c_attn.weight", 1, columns) in slices
    scorer = scorer_excluding_one_prompt(pair, equal_length_texts(7, 7))
    score = gradient_scores(scorer, components=["L1.attn.head1"], progress=False).frame["score"].item()
    fd = finite_difference(scorer, "L1.attn.head1")
    assert abs(fd) > 1e-5
    assert score == pytest.approx(fd, rel=2e-2, abs=1e-6)
