"""Held-out separation statistics (scipy-based) against textbook formulas, and the steering curve's
random-direction control and reference rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_texts
from weightpatch.anchors import _separation, build_anchor, cohens_d, roc_auc, steering_curve
from weightpatch.pair import load_pair


def _pooled_d(a: np.ndarray, b: np.ndarray) -> float:
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    return (a.mean() - b.mean()) / np.sqrt(pooled)


def _pairwise_auc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b]))


@pytest.mark.parametrize("sizes", [(12, 12), (7, 19)])
def test_cohens_d_and_auc_match_textbook_formulas(sizes):
    rng = np.random.default_rng(sum(sizes))
    a = rng.normal(1.0, 1.0, sizes[0])
    b = np.round(rng.normal(0.0, 2.0, sizes[1]), 0)  # rounded: ties within b
    a[:3] = b[:3]  # ties across the samples
    assert cohens_d(a, b) == pytest.approx(_pooled_d(a, b), rel=1e-12)
    assert roc_auc(a, b) == pytest.approx(_pairwise_auc(a, b), rel=1e-12)
    assert roc_auc(b, a) == pytest.approx(1 - roc_auc(a, b), rel=1e-12)
    sep = _separation(a, b)
    assert sep["mean_gap"] == pytest.approx(a.mean() - b.mean())


def test_degenerate_samples():
    assert np.isnan(cohens_d(np.array([1.0]), np.array([0.0, 1.0])))
    assert cohens_d(np.array([2.0, 2.0]), np.array([1.0, 1.0])) == np.inf
    assert np.isnan(cohens_d(np.array([1.0, 1.0]), np.array([1.0, 1.0])))
    assert roc_auc(np.array([2.0, 3.0]), np.array([1.0, 0.0])) == 1.0


def test_steering_random_directions_and_references(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    from weightpatch.scoring import AnchorScorer

    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 3))

    def metric(model) -> float:  # mean anchor score: moves by exactly alpha*scale along u
        return float(scorer.anchor_scores(model).mean())

    curve = steering_curve(pair, anchor, [0.0, 2.0], metric, scale=3.0, random_directions=5, seed=1, references=True)
    by = {d: sub for d, sub in curve.groupby("direction")}
    assert set(by) == {"anchor", "random", "base", "specialized"}
    assert by["random"]["draw"].tolist() == [0, 1, 2, 3, 4] and (by["random"]["alpha"] == 2.0).all()
    base = by["base"]["metric"].item()
    assert by["anchor"].set_index("alpha").loc[0.0, "metric"] == pytest.approx(base, abs=1e-5)
    assert by["anchor"].set_index("alpha").loc[2.0, "metric"] == pytest.approx(base + 6.0, abs=1e-3)
    # a random unit direction moves the projection on u by |<r, u>| * 6, far below 6 in 32 dims
    shifts = (by["random"]["metric"] - base).abs()
    assert (shifts < 6.0).all() and shifts.max() > 0
    assert by["specialized"]["metric"].item() == pytest.approx(float(scorer.f_donor.mean()), abs=1e-5)
    assert by["base"]["alpha"].isna().all()
    # seeded: the same draws again
    again = steering_curve(pair, anchor, [2.0], metric, scale=3.0, random_directions=5, seed=1)
    np.testing.assert_allclose(again[again["direction"] == "random"]["metric"], by["random"]["metric"])
    assert torch.equal(scorer.anchor_scores(pair.model), scorer.f_receiver)  # hooks removed
