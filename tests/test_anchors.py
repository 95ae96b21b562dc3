import pytest
import torch

from conftest import make_pair, tiny_texts
from weightpatch.anchors import Anchor, build_anchor, search_anchor_layer, steering_curve
from weightpatch.errors import WeightPatchError
from weightpatch.pair import load_pair


def test_search_picks_a_separating_layer_and_round_trips(llama_pair_dirs, tmp_path):
    pair = load_pair(*llama_pair_dirs)
    anchor, table = search_anchor_layer(pair, tiny_texts(12, 1), None, tiny_texts(12, 2), None, method="model_diff")
    assert list(table["layer"]) == [1, 2]  # range(max(1, 3 // 5), 3, 2) plus the last layer
    assert anchor.layer in (1, 2) and torch.isclose(anchor.vector.norm(), torch.tensor(1.0))
    assert table.set_index("layer").loc[anchor.layer, "auc"] == table["auc"].max()
    anchor.save(tmp_path / "anchor")
    loaded = Anchor.load(tmp_path / "anchor", pair)
    assert torch.equal(loaded.vector, anchor.vector) and loaded.layer == anchor.layer
    assert loaded.models == anchor.models and loaded.prompts_sha256 == anchor.prompts_sha256


def test_anchor_from_another_model_is_refused(llama_pair_dirs, tmp_path):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(4), None, layer=1, method="model_diff")
    other = load_pair(*make_pair("llama", tmp_path, scale=0.07))
    with pytest.raises(WeightPatchError, match="different specialized model"):
        anchor.check_compatible(other)
    wrong = Anchor(torch.ones(7), 1, "model_diff", anchor.models, anchor.prompts_sha256)
    with pytest.raises(WeightPatchError, match="hidden size is 32"):
        wrong.check_compatible(pair)
    with pytest.raises(WeightPatchError, match="out of range"):
        build_anchor(pair, tiny_texts(4), None, layer=5, method="model_diff")


def test_instruction_anchor_needs_paired_prompts(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    with pytest.raises(WeightPatchError, match="without its instruction"):
        build_anchor(pair, tiny_texts(4), None, layer=1, method="instruction")


def test_steering_adds_along_the_anchor(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    from weightpatch.scoring import AnchorScorer

    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 3))
    curve = steering_curve(pair, anchor, [0.0, 1.0, 2.0], lambda m: float(scorer.anchor_scores(m).mean()))
    steps = curve["metric"].diff().dropna()
    assert torch.allclose(torch.tensor(steps.values), torch.tensor(1.0, dtype=torch.float64), atol=1e-4)


def test_anchor_from_a_vector_scores_like_the_built_one(llama_pair_dirs):
    from weightpatch.scoring import AnchorScorer

    pair = load_pair(*llama_pair_dirs)
    built = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    bare = Anchor(built.vector * 3.0, 2, "model_diff", models={}, prompts_sha256="")
    with pytest.raises(WeightPatchError, match=r"records no base model.*Anchor\.from_vector"):
        AnchorScorer(pair, bare, tiny_texts(4, 3))
    mine = Anchor.from_vector(built.vector * 3.0, 2, pair)
    assert torch.allclose(mine.vector, built.vector, atol=1e-6) and mine.models == pair.identities()
    a, b = AnchorScorer(pair, mine, tiny_texts(4, 3)), AnchorScorer(pair, built, tiny_texts(4, 3))
    assert torch.allclose(a.gap, b.gap, atol=1e-5)
    with pytest.raises(WeightPatchError, match=r"norm 0\.0"):
        Anchor.from_vector(torch.zeros(32), 2, pair)
