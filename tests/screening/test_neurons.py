import pytest
import torch

from conftest import FAMILIES, make_pair, tiny_texts
from weightpatch.anchors import build_anchor
from weightpatch.pair import load_pair
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen
from weightpatch.screening.neurons import NeuronScreen

POST_MLP_NORM = {"gemma2", "gemma3", "olmo2"}  # a norm between the MLP output and the residual add


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_neuron_sweep_equals_patching_each_neuron(family, tmp_path):
    """Also where the variants skip their own block (blocks that add the MLP output to the
    residual) and where they cannot (a norm after the MLP), and in the anchor's own block (layer 2),
    where only the last position is read."""
    pair = load_pair(*make_pair(family, tmp_path, scale=0.2))
    anchor = build_anchor(pair, tiny_texts(4, length=8), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(5, 4, length=8), batch_size=3, min_relative_gap=0.0)
    screen = ExactScreen(scorer)
    neurons = NeuronScreen(screen, neurons_per_forward=7)
    for layer in (0, 1, 2):
        fast = neurons.run_layer(layer, neurons=range(10), progress=False).frame.set_index("component")
        one_by_one = screen.run([f"L{layer}.mlp.neuron{j}" for j in range(10)], progress=False)
        slow = one_by_one.frame.set_index("component")
        assert neurons.layer_state(layer).additive == (family not in POST_MLP_NORM)
        assert slow["score"].abs().max() > 1e-4
        torch.testing.assert_close(
            torch.tensor(fast.loc[slow.index, "score"].values), torch.tensor(slow["score"].values), atol=1e-5, rtol=1e-3
        )


def test_neuron_rows_match_the_exact_screen_row_for_row_and_are_zero_above_the_anchor(tmp_path):
    pair = load_pair(*make_pair("llama", tmp_path, scale=0.2, num_layers=4))
    anchor = build_anchor(pair, tiny_texts(4, length=8), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(5, 4, length=8), batch_size=3)
    screen = ExactScreen(scorer)
    table = NeuronScreen(screen, neurons_per_forward=5).run(progress=False).frame.set_index("component")
    assert len(table) == 4 * 48 and set(table["layer"]) == {0, 1, 2, 3}  # run() covers every layer
    one = NeuronScreen(screen, neurons_per_forward=5).run(layers=[1], progress=False).frame.set_index("component")
    assert len(one) == 48 and set(one["layer"]) == {1} and one["score"].equals(table.loc[one.index, "score"])
    names = ["L0.mlp.neuron3", "L2.mlp.neuron7", "L2.mlp.neuron40", "L3.mlp.neuron1"]
    slow = screen.run(names, progress=False).frame.set_index("component")
    columns = ["kind", "component_class", "layer", "index", "method", "n_prompts"]
    assert table.loc[names, columns].equals(slow.loc[names, columns])
    torch.testing.assert_close(
        torch.tensor(table.loc[names, ["score", "stderr"]].values),
        torch.tensor(slow.loc[names, ["score", "stderr"]].values),
        atol=1e-5,
        rtol=1e-3,
    )
    above = table[table["layer"] == 3]
    assert (above["score"] == 0).all() and (above["stderr"] == 0).all()
    assert (above["n_prompts"] == int(scorer.valid.sum())).all()


def test_a_neuron_subset_over_several_batches_in_float64(tmp_path):
    """Neurons given out of order, prompts in three batches (each batch's scores land in its own
    columns), float64 throughout: equal to the one-by-one exact screen to float64 round-off (GPT-2's
    LayerNorm computes in the model's dtype)."""
    pair = load_pair(*make_pair("gpt2", tmp_path, scale=0.2), dtype="float64")
    anchor = build_anchor(pair, tiny_texts(4, length=8), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 4, length=8), batch_size=2, min_relative_gap=0.0)
    assert len(scorer.batches) == 3
    screen = ExactScreen(scorer)
    order = [9, 2, 30]
    for layer in (0, 2):
        fast = NeuronScreen(screen, neurons_per_forward=2).run_layer(layer, neurons=order, progress=False).frame
        assert fast["component"].tolist() == [f"L{layer}.mlp.neuron{j}" for j in order]
        slow = screen.run(fast["component"], progress=False).frame
        assert slow["score"].abs().max() > 1e-3
        torch.testing.assert_close(
            torch.tensor(fast[["score", "stderr"]].values),
            torch.tensor(slow[["score", "stderr"]].values),
            atol=1e-12,
            rtol=1e-9,
        )


def test_neurons_the_fine_tune_left_alone_score_exactly_zero(tmp_path):
    """On the planted pair only neurons 3 and 7 of layer 0 differ: every other neuron scores 0.0
    exactly, also in the anchor's own block (layer 2), whose base output and activations are
    computed on the last position like the receiver's anchor scores."""
    from test_roles import NEURONS, planted_scorer

    scorer = planted_scorer(tmp_path)
    neurons = NeuronScreen(ExactScreen(scorer), neurons_per_forward=4)
    for layer in (0, 1, 2):
        table = neurons.run_layer(layer, neurons=range(10), progress=False).frame
        planted = table["index"].isin(NEURONS) & (layer == 0)
        assert (table.loc[~planted, "score"] == 0.0).all(), layer
        assert (table.loc[planted, "score"] > 0.1).all()
