import pytest
import torch

from conftest import tiny_texts
from weightpatch.anchors import build_anchor
from weightpatch.errors import WeightPatchError
from weightpatch.pair import load_pair
from weightpatch.patch import patched
from weightpatch.scoring import AnchorScorer


def test_patching_everything_recovers_the_whole_gap_and_nothing_recovers_none(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(8, 5))
    with patched(pair.model, pair.donor, pair.space, pair.space.everything()):
        assert scorer.effect(scorer.anchor_scores(pair.model)).mean == pytest.approx(1.0, abs=1e-6)
    e = scorer.effect(scorer.anchor_scores(pair.model))
    assert e.mean == 0.0 and e.n_prompts == 8 - scorer.n_excluded


def test_tiny_gaps_are_excluded_and_counted(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(16, 5), min_relative_gap=0.9)
    expected = (scorer.gap.abs() <= 0.9 * scorer.gap.abs().median()).sum()
    assert scorer.n_excluded == expected > 0
    assert scorer.effect(scorer.f_receiver).n_prompts == 16 - scorer.n_excluded


def test_an_anchor_that_sees_no_gap_is_refused(tmp_path):
    from conftest import save, tiny_model

    base = tiny_model("llama")
    pair = load_pair(save(base, tmp_path / "a"), save(base, tmp_path / "b"))  # identical models
    anchor = build_anchor(pair, tiny_texts(4), tiny_texts(4, 9), layer=1, method="instruction")
    message = (
        r"^the anchor does not separate the two models on these prompts \(every gap is ~0\); "
        r"use prompts that exercise the capability or rebuild the anchor$"
    )
    with pytest.raises(WeightPatchError, match=message):
        AnchorScorer(pair, anchor, tiny_texts(4, 3))
    with pytest.raises(WeightPatchError, match="empty"):
        AnchorScorer(pair, anchor, [])


def test_knockout_scores_fraction_removed(llama_pair_dirs):
    base_pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(base_pair, tiny_texts(6), None, layer=1, method="model_diff")
    knockout = load_pair(*llama_pair_dirs, receiver="specialized")
    scorer = AnchorScorer(knockout, anchor, tiny_texts(8, 5))
    repair = AnchorScorer(base_pair, anchor, tiny_texts(8, 5))
    assert torch.allclose(scorer.gap, -repair.gap, atol=1e-5)
    with patched(knockout.model, knockout.donor, knockout.space, knockout.space.everything()):
        assert scorer.effect(scorer.anchor_scores(knockout.model)).mean == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("dtype", "score_dtype"), [("float64", torch.float64), ("float32", torch.float32), ("bfloat16", torch.float32)]
)
def test_scores_accumulate_in_float64_for_float64_models_else_float32(llama_pair_dirs, dtype, score_dtype):
    pair = load_pair(*llama_pair_dirs, dtype=dtype)
    anchor = build_anchor(pair, tiny_texts(4), None, layer=1, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(4, 5))
    assert scorer.u.dtype == scorer.f_receiver.dtype == scorer.gap.dtype == score_dtype
    torch.testing.assert_close(scorer.u.double(), anchor.vector.double(), atol=1e-7, rtol=0)


def test_empty_prompt_set_message(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(4), None, layer=1, method="model_diff")
    with pytest.raises(WeightPatchError, match=r"^no prompts to score; the prompt set is empty$"):
        AnchorScorer(pair, anchor, [])


def test_excluded_prompts_are_named_in_a_warning(llama_pair_dirs, caplog):
    """The scorer drops prompts with a tiny anchor gap from every mean; it now says how many and why
    (only the pipeline said so before, the engine was silent)."""
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    with caplog.at_level("WARNING", logger="weightpatch"):
        scorer = AnchorScorer(pair, anchor, tiny_texts(8, 5), min_relative_gap=1.0)  # at most half survive
    assert scorer.n_excluded >= 1
    assert f"{scorer.n_excluded} of 8 prompts have an anchor gap below 1 x the median" in caplog.text
