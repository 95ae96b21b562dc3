import numpy as np
import pytest
import torch

from conftest import tiny_texts
from test_roles import PLANTED_HEAD, PLANTED_NEURONS, planted_scorer
from weightpatch.anchors import build_anchor
from weightpatch.pair import load_pair
from weightpatch.results import ScoreTable, score_row
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen
from weightpatch.validation import (
    behavior_of,
    interaction_matrix,
    necessity_curve,
    next_token_logprobs,
    specialized_logprobs,
    sufficiency_curve,
)


def _everything_table(pair):
    return ScoreTable.from_rows(score_row(c, "exact", 1.0, 0.0, 1) for c in pair.space.everything())


@pytest.mark.parametrize("receiver", ["base", "specialized"])
def test_all_components_recover_everything_and_their_knockout_removes_everything(llama_pair_dirs, receiver):
    base_pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(base_pair, tiny_texts(6), None, layer=2, method="model_diff")
    pair = base_pair if receiver == "base" else load_pair(*llama_pair_dirs, receiver="specialized")
    scorer = AnchorScorer(pair, anchor, tiny_texts(8, 5))
    table = _everything_table(pair)
    n = len(table)
    calls = []

    def metric(model):
        calls.append(1)
        return 0.25

    suff = sufficiency_curve(scorer, table, ks=[1, n], controls=5, kl=True, behavior_metric=metric)
    assert list(suff["k"]) == [1, n]
    last = suff.iloc[-1]
    assert last["recovery"] == pytest.approx(1.0, abs=1e-6) and last["kl"] == pytest.approx(0.0, abs=1e-6)
    # every k-subset of n is everything: no control is drawn there (a degenerate control)
    assert suff["n_controls"].tolist() == [5, 0] and np.isnan(last["random_mean"])
    assert suff["behavior"].tolist() == [0.25, 0.25] and len(calls) == 2
    few = necessity_curve(scorer, table, ks=[1], controls=3)  # too few draws for a spread: raised to 5
    assert few["n_controls"].tolist() == [5]
    nec = necessity_curve(scorer, table, ks=[n], controls=0, kl=True)
    assert nec.iloc[0]["drop"] == pytest.approx(1.0, abs=1e-6) and nec.iloc[0]["kl"] > 0
    # the model is restored after every run
    assert torch.equal(scorer.anchor_scores(pair.model), scorer.f_receiver)


def test_knockout_and_patch_agree_between_the_two_receivers(llama_pair_dirs):
    base_pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(base_pair, tiny_texts(6), None, layer=1, method="model_diff")
    texts = tiny_texts(8, 5)
    scorers = [
        AnchorScorer(base_pair, anchor, texts),
        AnchorScorer(load_pair(*llama_pair_dirs, receiver="specialized"), anchor, texts),
    ]
    table = ScoreTable.from_rows(
        score_row(base_pair.space.parse(c), "exact", s, 0.0, 1)
        for c, s in [("L0.mlp", 3.0), ("L1.attn", 2.0), ("L0.attn.head1", 1.0)]
    )
    suff = [sufficiency_curve(s, table, ks=3, controls=0)["recovery"] for s in scorers]
    nec = [necessity_curve(s, table, ks=3, controls=0)["drop"] for s in scorers]
    assert torch.allclose(torch.tensor(suff[0].values), torch.tensor(suff[1].values), atol=1e-4)
    assert torch.allclose(torch.tensor(nec[0].values), torch.tensor(nec[1].values), atol=1e-4)
    b = [behavior_of(s, ["L0.mlp"], mode="necessity") for s in scorers]
    assert b[0]["anchor"] == pytest.approx(b[1]["anchor"], abs=1e-4) and b[0]["kl"] == pytest.approx(
        b[1]["kl"], abs=1e-5
    )


def test_planted_components_beat_random_controls_and_interact(tmp_path):
    scorer = planted_scorer(tmp_path)
    components = list(scorer.pair.space.components(kinds=("head", "neuron")))
    weight = ExactScreen(scorer).run(components, progress=False)
    suff = sufficiency_curve(scorer, weight, ks=3, controls=5, seed=1)
    assert suff.iloc[1]["recovery"] > 0.95 > suff.iloc[1]["random_mean"] + 3 * suff.iloc[1]["random_std"]
    assert set(suff.iloc[1]["components"]) == set(PLANTED_NEURONS)
    nec = necessity_curve(scorer, weight, ks=[2], controls=5, seed=1)
    assert nec.iloc[0]["drop"] > 0.95
    matrix = interaction_matrix(scorer, [*PLANTED_NEURONS, PLANTED_HEAD])
    assert matrix.shape == (3, 3) and matrix.isna().values.diagonal().all()
    assert matrix.equals(matrix.T)
    # the two neurons write the same direction: together they are far from the sum of each alone
    assert abs(matrix.loc[PLANTED_NEURONS[0], PLANTED_NEURONS[1]]) > 0.05
    single = matrix.attrs["single"]
    assert single[PLANTED_NEURONS[0]] == pytest.approx(
        weight.frame.set_index("component").loc[PLANTED_NEURONS[0], "score"], abs=1e-6
    )


def test_a_curve_patches_the_complement_once_and_gives_each_knockout_exactly(llama_pair_dirs):
    """Necessity on a base-receiver pair holds one full donor patch for the whole curve: every top-k drop
    equals the knockout model built on its own, and the base is restored bit for bit afterwards."""
    from weightpatch.validation import _gap_fraction, with_knockout

    pair = load_pair(*llama_pair_dirs)
    before = {n: p.detach().clone() for n, p in pair.model.named_parameters()}
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(8, 5))
    table = ScoreTable.from_rows(
        score_row(pair.space.parse(c), "exact", s, 0.0, 1)
        for c, s in [("L0.mlp", 4.0), ("L1.attn.head1", 3.0), ("L1.mlp.neuron3", 2.0), ("L2.attn", 1.0)]
    )
    curve = necessity_curve(scorer, table, ks=[1, 2, 3], controls=5)
    for row in curve.itertuples():
        with torch.no_grad(), with_knockout(pair, row.components) as model:
            assert row.drop == _gap_fraction(scorer, scorer.anchor_scores(model), "base")
    assert all(torch.equal(before[n], p) for n, p in pair.model.named_parameters())


def test_behavior_of_uses_a_given_reference_and_computes_the_same_one_itself(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(8, 5))
    reference = specialized_logprobs(scorer)
    own = behavior_of(scorer, ["L0.mlp"])
    given = behavior_of(scorer, ["L0.mlp"], reference=reference)
    assert given == own
    # against the base's own distribution instead, the KL of a model that is not the base is not the same
    base_reference = next_token_logprobs(pair.model, scorer.batches)
    assert behavior_of(scorer, ["L0.mlp"], reference=base_reference)["kl"] != pytest.approx(own["kl"], rel=1e-3)
