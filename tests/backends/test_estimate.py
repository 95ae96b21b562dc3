"""Duration estimates of exact sweeps: the cost model's arithmetic, the calibration picks, and the
local backend's estimate against a fake clock (no timed test)."""

import logging

import pytest

from conftest import tiny_texts
from weightpatch.anchors import build_anchor
from weightpatch.backends import LocalBackend, plan_shards
from weightpatch.backends import local as local_backend
from weightpatch.backends.estimate import (
    CostModel,
    Work,
    calibration_picks,
    format_duration,
    shard_work,
    split_for_calibration,
)
from weightpatch.pair import load_pair
from weightpatch.scoring import AnchorScorer


def test_cost_model_recovers_linear_costs_and_stays_non_negative():
    a, b = 0.5, 0.25
    samples = [(w, a * w.n + b * w.blocks) for w in (Work(8, 8 * 3), Work(8, 8 * 1), Work(4, 4 * 2))]
    model = CostModel.fit(samples)
    assert model.per_component == pytest.approx(a) and model.per_block == pytest.approx(b)
    assert model.seconds(Work(100, 700)) == pytest.approx(100 * a + 700 * b)
    one_depth = CostModel.fit([(Work(8, 16), 4.0), (Work(4, 8), 2.0)])  # same depth: time per block
    assert (one_depth.per_component, one_depth.per_block) == (0.0, pytest.approx(0.25))
    falling = CostModel.fit([(Work(1, 1), 2.0), (Work(1, 5), 1.0)])  # deeper but faster (noise)
    assert falling.per_block == 0.0 and falling.per_component == pytest.approx(1.5)
    assert CostModel.fit([(Work(0, 0), 3.0)]) == CostModel(0.0, 0.0)


def test_calibration_picks_spread_over_depths_and_skip_free_shards():
    works = [Work(0, 0), Work(2, 10), Work(2, 10), Work(2, 8), Work(2, 6), Work(2, 4), Work(2, 2)]
    assert calibration_picks(works) == [1, 4, 6]  # deepest, middle, shallowest: first shard of each
    assert calibration_picks(works[:3]) == [1]
    assert calibration_picks(works[:4], count=3) == [1, 3]


def test_split_for_calibration_keeps_every_name_once():
    names = [f"L{layer}.mlp.neuron{j}" for layer in range(3) for j in range(10)] + ["L0.attn.head1", "L2.mlp"]
    shards = plan_shards(names, shard_size=8, neuron_shard_size=6)
    works = [Work(len(s), len(s) * (3 - s.layer)) for s in shards]  # anchor 2
    calibration, rest = split_for_calibration(shards, works, {"neuron": 4, "component": 8})
    assert [(s.layer, len(s), s.neurons) for s in calibration] == [
        (0, 4, True), (1, 4, True), (2, 4, True), (0, 1, False), (2, 1, False)
    ]  # fmt: skip
    flat = [n for s in calibration + rest for n in s.names]
    assert sorted(flat) == sorted(names)
    assert format_duration(42) == "42 s" and format_duration(200) == "3 min 20 s"
    assert format_duration(41 * 60) == "41 min" and format_duration(2 * 3600 + 300) == "2 h 05 min"


@pytest.fixture(scope="module")
def scorer(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    return AnchorScorer(pair, anchor, tiny_texts(6, 4), batch_size=4, min_relative_gap=0.0)


def test_local_estimate_is_calibration_plus_fitted_rest(scorer, monkeypatch, caplog):
    """Every piece "takes" 0.5 s per component plus 0.25 s per block it re-runs on a fake clock:
    the estimate must be exactly the fake total, and cover only what is not done."""
    space, anchor = scorer.pair.space, scorer.layer
    now = [0.0]
    real = local_backend.score_shard

    def fake_cost(state, shard):
        work = shard_work(space, anchor, shard)
        now[0] += 0.5 * work.n + 0.25 * work.blocks
        return real(state, shard)

    monkeypatch.setattr(local_backend, "score_shard", fake_cost)
    names = [str(c) for c in space.components(kinds=("neuron", "head"))]  # layer 2 is above the anchor
    done = {n for n in names if n.startswith("L0.mlp.neuron") and int(n.rsplit("neuron", 1)[1]) < 20}
    backend = LocalBackend.from_scorer(scorer, neurons_per_forward=4, neuron_shard_size=8, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="weightpatch"):
        table = backend.run(names, skip=done, progress=False)
    assert len(table) == len(names) - len(done)
    by_engine = {e.engine: e for e in backend.estimates}
    neurons = by_engine["neuron"]
    n_below = 2 * space.num_neurons(0) - len(done)  # layers 0 and 1 reach the anchor
    assert neurons.n_components == n_below and neurons.layers == (0, 1)
    assert neurons.calibration_n == 8 and neurons.calibration_layers == (0, 1)
    n0 = space.num_neurons(0) - len(done)
    assert neurons.seconds == pytest.approx(0.5 * n_below + 0.25 * (2 * n0 + (n_below - n0)))
    assert neurons.model.per_component == pytest.approx(0.5) and neurons.model.per_block == pytest.approx(0.25)
    heads = by_engine["component"]
    per_layer = space.dims.num_heads
    assert heads.n_components == 2 * per_layer
    assert heads.seconds == pytest.approx(0.5 * 2 * per_layer + 0.25 * 3 * per_layer)
    assert sum(t for s, _, t in backend.timings) == pytest.approx(neurons.seconds + heads.seconds)
    assert f"exact neuron sweep: {n_below} neurons in 2 layers, estimated" in caplog.text
    assert "calibrated on 8 neurons at layers 0, 1" in caplog.text
