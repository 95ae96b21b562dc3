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
    from weightpatch.validation import gap_fraction, with_knockout

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
            assert row.drop == gap_fraction(scorer, scorer.anchor_scores(model), "base")
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


# ---- values by hand: each row is the model patched on its own, measured with the gap formula ----
def _hand_fraction(scorer, f: torch.Tensor) -> float:
    """Mean over the kept prompts of (F - F_base) / (F_sft - F_base) for a base-receiver scorer."""
    return float(((f - scorer.f_receiver) / (scorer.f_donor - scorer.f_receiver))[scorer.valid].double().mean())


def _hand_kl(reference_model, model, scorer, positions: str) -> float:
    """KL(P_ref || P_model) of next-token distributions, averaged over last tokens or every real token."""
    total, count = 0.0, 0
    for batch in scorer.batches:
        with torch.no_grad():
            ref = torch.log_softmax(reference_model(**batch.kwargs()).logits.double(), -1)
            got = torch.log_softmax(model(**batch.kwargs()).logits.double(), -1)
        kl = (ref.exp() * (ref - got)).sum(-1)
        keep = batch.attention_mask.bool() if positions == "all" else torch.zeros_like(kl, dtype=torch.bool)
        if positions == "last":
            keep[:, -1] = True
        total, count = total + float(kl[keep].sum()), count + int(keep.sum())
    return total / count


def _table(pair, scored: list[tuple[str, str, float]]):
    return ScoreTable.from_rows(score_row(pair.space.parse(c), method, s, 0.0, 1) for c, method, s in scored)


def test_curve_rows_are_measured_by_hand_on_their_own_patched_models(llama_pair_dirs):
    import random

    from transformers import AutoModelForCausalLM

    from weightpatch.patch import patched

    pair = load_pair(*llama_pair_dirs)
    sft = AutoModelForCausalLM.from_pretrained(llama_pair_dirs[1]).eval()
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(7, 5), batch_size=3)  # three batches, left-padded
    table = _table(
        pair,
        [
            ("L0.mlp", "exact", 4.0),
            ("L1.attn.head1", "exact", 3.0),
            ("L2.attn", "exact", 3.0),  # a tie: the earlier row ranks first
            ("L1.mlp.neuron3", "exact", 2.0),
            ("L0.attn", "exact", 1.0),
            ("L1.mlp", "first_order", 9.0),  # another method: not in the exact ranking
        ],
    )
    ranked = ["L0.mlp", "L1.attn.head1", "L2.attn", "L1.mlp.neuron3", "L0.attn"]

    def patched_fraction(components) -> float:
        with torch.no_grad(), patched(pair.model, pair.donor, pair.space, components):
            return _hand_fraction(scorer, scorer.anchor_scores(pair.model))

    seen = []
    curve = sufficiency_curve(
        scorer,
        table,
        ks=[0, 3, 1, 99],  # 0 is dropped, 99 is the whole pool
        method="exact",
        controls=5,
        seed=7,
        kl=True,
        kl_positions="all",
        behavior_metric=lambda model: seen.append(1) or float(scorer.anchor_scores(model).mean()),
    )
    assert curve["k"].tolist() == [1, 3, 5] and curve["components"].tolist() == [ranked[:1], ranked[:3], ranked]
    from weightpatch.validation import control_pool  # (a local import: the file imports on 1ca0c48, issue 30)

    pool = control_pool(pair.space, ranked)  # the ranked five, then the one block that holds none of them
    assert pool == [*ranked, "L2.mlp"] and curve.attrs["control_pool"] == 6
    rng = random.Random(7)  # the controls: seeded draws of k of the pool, k after k
    for row in curve.itertuples():
        assert row.recovery == pytest.approx(patched_fraction(ranked[: row.k]), abs=1e-6)
        draws = [patched_fraction(rng.sample(pool, row.k)) for _ in range(5)]
        assert row.n_controls == len(draws)
        if draws:
            assert row.random_mean == pytest.approx(np.mean(draws), abs=1e-6)
            assert row.random_std == pytest.approx(np.std(draws, ddof=1), abs=1e-6)
        with torch.no_grad(), patched(pair.model, pair.donor, pair.space, ranked[: row.k]):
            assert row.kl == pytest.approx(_hand_kl(sft, pair.model, scorer, "all"), rel=1e-4, abs=1e-7)
            assert row.behavior == pytest.approx(float(scorer.anchor_scores(pair.model).mean()), abs=1e-6)
    assert len(seen) == 3
    last = sufficiency_curve(scorer, table, ks=2, method="exact", controls=0, kl=True)
    assert last["k"].tolist() == [1, 2] and last["n_controls"].tolist() == [0, 0]
    with torch.no_grad(), patched(pair.model, pair.donor, pair.space, ranked[:2]):
        assert last["kl"].iloc[1] == pytest.approx(_hand_kl(sft, pair.model, scorer, "last"), rel=1e-4, abs=1e-7)
    heads = sufficiency_curve(scorer, table, ks=5, kind="head", controls=0)
    assert heads["components"].tolist() == [["L1.attn.head1"]]
    with pytest.raises(ValueError, match=r"^the score table has no rows for this method/kind$"):
        sufficiency_curve(scorer, table, method="ig")


def test_necessity_and_behavior_values_by_hand(llama_pair_dirs):
    from transformers import AutoModelForCausalLM

    from weightpatch.patch import patched

    pair = load_pair(*llama_pair_dirs)
    sft_pair = load_pair(*llama_pair_dirs, receiver="specialized")  # knockouts built the other way round
    sft = AutoModelForCausalLM.from_pretrained(llama_pair_dirs[1]).eval()
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(7, 5), batch_size=4)
    table = _table(pair, [("L0.mlp", "exact", 3.0), ("L1.attn", "exact", 2.0), ("L2.mlp.neuron5", "exact", 1.0)])

    def knocked_out(components):
        return patched(sft_pair.model, sft_pair.donor, sft_pair.space, components)

    def hand_drop(components) -> float:
        with torch.no_grad(), knocked_out(components):
            f = scorer.anchor_scores(sft_pair.model)
        return float(((scorer.f_donor - f) / (scorer.f_donor - scorer.f_receiver))[scorer.valid].double().mean())

    curve = necessity_curve(scorer, table, ks=[1, 2], controls=0, kl=True, behavior_metric=lambda m: 0.5)
    for row in curve.itertuples():
        assert row.drop == pytest.approx(hand_drop(["L0.mlp", "L1.attn"][: row.k]), abs=1e-5)
        with torch.no_grad(), knocked_out(["L0.mlp", "L1.attn"][: row.k]):
            assert row.kl == pytest.approx(_hand_kl(sft, sft_pair.model, scorer, "last"), rel=1e-4, abs=1e-7)
    assert curve["behavior"].tolist() == [0.5, 0.5]
    # behavior_of: the same two directions, one model each
    out = behavior_of(scorer, ["L1.attn"], mode="necessity", kl_positions="all", behavior_metric=lambda m: 2.0)
    assert out["anchor"] == pytest.approx(hand_drop(["L1.attn"]), abs=1e-5) and out["behavior"] == 2.0
    with torch.no_grad(), knocked_out(["L1.attn"]):
        assert out["kl"] == pytest.approx(_hand_kl(sft, sft_pair.model, scorer, "all"), rel=1e-4, abs=1e-7)
    default = behavior_of(scorer, ["L1.attn"])  # sufficiency, last tokens, no metric
    with torch.no_grad(), patched(pair.model, pair.donor, pair.space, ["L1.attn"]):
        assert default["anchor"] == pytest.approx(_hand_fraction(scorer, scorer.anchor_scores(pair.model)), abs=1e-6)
        assert default["kl"] == pytest.approx(_hand_kl(sft, pair.model, scorer, "last"), rel=1e-4, abs=1e-7)
    assert set(default) == {"anchor", "kl"}
    with pytest.raises(ValueError):  # a reference for other batches is refused, not silently cut
        behavior_of(scorer, ["L1.attn"], reference=specialized_logprobs(scorer)[:1])


def test_interactions_from_a_table_take_its_top_m(llama_pair_dirs, caplog):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 5))
    names = [f"L{layer}.mlp.neuron{i}" for layer in range(2) for i in range(5)]  # 10 components
    table = _table(pair, [(c, "exact", float(10 - i)) for i, c in enumerate(names)])
    matrix = interaction_matrix(scorer, table=table)
    assert matrix.index.tolist() == names[:8] and matrix.dtypes.eq(np.float64).all()  # m = 8 by default
    assert interaction_matrix(scorer, table=table, m=3, kind="neuron").index.tolist() == names[:3]
    with pytest.raises(ValueError, match=r"^give components or a score table to take the top-m from$"):
        interaction_matrix(scorer)
    with caplog.at_level("WARNING", logger="weightpatch"):
        few = sufficiency_curve(scorer, table, ks=[1], controls=2)
    assert few["n_controls"].tolist() == [5]
    assert "controls=2 raised to 5: fewer random draws give no usable spread" in caplog.text


def test_curve_defaults_filters_and_control_counts(llama_pair_dirs, caplog):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 5))
    neurons = [f"L{layer}.mlp.neuron{i}" for layer in range(2) for i in range(6)]  # 12 of them
    table = _table(
        pair,
        [(c, "exact", float(12 - i)) for i, c in enumerate(neurons)]
        # rows each filter must drop: another method's neuron and module, the same method's module
        + [("L1.mlp", "first_order", 99.0), ("L1.mlp.neuron0", "first_order", 50.0), ("L0.attn", "exact", 60.0)],
    )
    for curve_of, column in ((sufficiency_curve, "recovery"), (necessity_curve, "drop")):
        default = curve_of(scorer, table, method="exact", kind="neuron", controls=5)
        assert default["k"].tolist() == list(range(1, 11)) and "kl" not in default  # ks = 10, no KL by default
        assert default["components"].iloc[0] == [neurons[0]]  # the first_order row is filtered out
        seeded = curve_of(scorer, table, ks=[2], method="exact", kind="neuron", controls=5, seed=0)
        alone = curve_of(scorer, table, ks=[2], method="exact", kind="neuron", controls=5)
        other = curve_of(scorer, table, ks=[2], method="exact", kind="neuron", controls=5, seed=1)
        assert alone["random_mean"].iloc[0] == seeded["random_mean"].iloc[0] != other["random_mean"].iloc[0]
        assert column in default
        with pytest.raises(ValueError, match=r"2 methods \(first_order, exact\); pass method="):
            curve_of(scorer, table, ks=[1], kind="module", controls=0)  # ranked L1.mlp's 99 over L0.attn's 60
    caplog.clear()  # the curves above logged where their controls come from
    with caplog.at_level("WARNING", logger="weightpatch"):
        one = sufficiency_curve(scorer, table, ks=[1], method="exact", kind="neuron", controls=1)
        five = sufficiency_curve(scorer, table, ks=[1], method="exact", kind="neuron", controls=5)
    assert one["n_controls"].tolist() == [5] and five["n_controls"].tolist() == [5]
    assert [r.getMessage() for r in caplog.records] == [
        "controls=1 raised to 5: fewer random draws give no usable spread"
    ]  # 5 is enough: no warning for it


def test_output_kl_defaults_to_last_tokens_and_refuses_a_short_reference(llama_pair_dirs):
    from transformers import AutoModelForCausalLM

    from weightpatch.validation import output_kl

    pair = load_pair(*llama_pair_dirs)
    sft = AutoModelForCausalLM.from_pretrained(llama_pair_dirs[1]).eval()
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(7, 5), batch_size=3)
    reference = specialized_logprobs(scorer)
    assert output_kl(pair.model, scorer.batches, reference) == pytest.approx(
        _hand_kl(sft, pair.model, scorer, "last"), rel=1e-4
    )
    assert output_kl(pair.model, scorer.batches, reference) != pytest.approx(
        _hand_kl(sft, pair.model, scorer, "all"), rel=1e-3
    )
    with pytest.raises(ValueError):
        output_kl(pair.model, scorer.batches, reference[:2])


def test_rankings_keep_table_order_among_many_ties_and_metrics_get_the_patched_model(llama_pair_dirs):
    from weightpatch.patch import patched
    from weightpatch.validation import _ranking

    pair = load_pair(*llama_pair_dirs)
    names = [f"L{layer}.mlp.neuron{i}" for layer in range(3) for i in range(20)]
    scores = [float((i * 7) % 3) for i in range(60)]  # three values, 20 ties each, interleaved
    table = _table(pair, list(zip(names, ["exact"] * 60, scores, strict=True)))
    expected = [c for level in (2.0, 1.0, 0.0) for c, s in zip(names, scores, strict=True) if s == level]
    assert _ranking(table, None, None) == expected  # ties keep the table's order (numpy's quicksort does not)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 5))
    out = behavior_of(scorer, ["L0.mlp"], behavior_metric=lambda m: float(scorer.anchor_scores(m).mean()))
    with torch.no_grad(), patched(pair.model, pair.donor, pair.space, ["L0.mlp"]):
        assert out["behavior"] == pytest.approx(float(scorer.anchor_scores(pair.model).mean()), abs=1e-6)
    mixed = _table(pair, [("L1.mlp", "first_order", 9.0), ("L0.mlp", "exact", 1.0), ("L0.attn.head1", "exact", 0.5)])
    matrix = interaction_matrix(scorer, table=mixed, m=2, method="exact", kind="module")
    assert matrix.index.tolist() == ["L0.mlp"]


def test_curves_rank_disjoint_components_and_draw_controls_from_the_whole_kind(llama_pair_dirs, caplog):
    """The issue's recipe: an exact table of a few verified components with nested ones (L0.mlp and its
    neurons and projections) ranked together, and random controls drawn from those few. Now nested
    ones are left out with a warning, and controls come from every component of the kind."""
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(8, 5))
    rows = [("L0.mlp", 0.9), ("L0.mlp.down", 0.8), ("L1.attn", 0.5), ("L0.mlp.gate", 0.4), ("L2.mlp", 0.1)]
    table = ScoreTable.from_rows(score_row(pair.space.parse(c), "exact", s, 0.0, 1) for c, s in rows)
    with caplog.at_level("WARNING", logger="weightpatch"):
        curve = sufficiency_curve(scorer, table, ks=3, method="exact", controls=5)
    assert curve.iloc[-1]["components"] == ["L0.mlp", "L1.attn", "L2.mlp"]
    assert "2 of 5 ranked components lie inside other ranked ones (e.g. L0.mlp.down)" in caplog.text
    blocks = {c.name for c in pair.space.components(kinds=["module"]) if c.component_class in ("mlp", "attention")}
    assert curve.attrs["control_pool"] == len(blocks) == 6  # every attention and MLP block, not the 3 ranked
    assert curve["n_controls"].tolist() == [5, 5, 5]  # k = 3 < 6: controls are drawn at every k
    mixed = ScoreTable.concat([table, ScoreTable.from_rows([score_row(pair.space.parse("L1.mlp"), "ig", 1.0, 0, 1)])])
    with pytest.raises(ValueError, match=r"2 methods \(exact, ig\); pass method="):
        sufficiency_curve(scorer, mixed, ks=1, controls=0)


def test_a_curve_plots_itself_as_the_reports_figure(llama_pair_dirs):
    """``curve.plot()`` (issue 30: curves had no notebook face) is the report's curve figure: the top-k
    line, the random-k controls as error bars (mean ± sd), the report's title; with arguments it is
    pandas' own plot. Slices stay curves."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 5))
    table = _table(pair, [(f"L{layer}.mlp.neuron{i}", "exact", float(10 - i)) for layer in range(2) for i in range(5)])
    for curve_of, column, title in (
        (sufficiency_curve, "recovery", "sufficiency: top-k patched into base"),
        (necessity_curve, "drop", "necessity: top-k knocked out of specialized"),
    ):
        curve = curve_of(scorer, table, ks=[1, 2, 4], method="exact", kind="neuron", controls=5)
        fig = curve.plot()
        assert isinstance(fig, Figure)  # it was pandas' plot of every numeric column (an Axes)
        ax = fig.axes[0]
        assert ax.get_title() == title
        from weightpatch.figures import curve_figure
        from weightpatch.validation import Curve

        assert isinstance(curve, Curve) and isinstance(curve[curve["k"] > 1], Curve)
        top = ax.lines[0]
        assert list(top.get_xdata()) == [1, 2, 4] and list(top.get_ydata()) == curve[column].tolist()
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["top-k", "random k (mean ± sd)"]
        controls = ax.containers[0]  # the error bars: their line is the random mean
        assert list(controls.lines[0].get_ydata()) == curve["random_mean"].tolist()
        same = curve_figure(curve, "sufficiency" if column == "recovery" else "necessity").axes[0]
        assert same.get_title() == title and list(same.lines[0].get_ydata()) == list(top.get_ydata())
        axes = curve.plot(x="k", y="random_std")  # pandas' plot when asked for one
        assert not isinstance(axes, Figure) and list(axes.lines[0].get_ydata()) == curve["random_std"].tolist()
        plt.close("all")
