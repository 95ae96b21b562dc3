import pandas as pd
import pytest
import torch

from conftest import FAMILIES, make_pair, tiny_texts
from weightpatch.anchors import build_anchor
from weightpatch.pair import load_pair
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen, plain_exact_scores


@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_batched_path_equals_plain_full_forward(family, tmp_path):
    """Families with per-layer attention types (Gemma2/3, Mistral sliding windows, Qwen layer_types)
    must keep each layer's own mask and rotary inputs when blocks are skipped. Four blocks and the
    anchor at block 3, so components of block 1 run block 1 alone and then the stacked variants
    through blocks 2..3."""
    pair = load_pair(*make_pair(family, tmp_path, scale=0.2, num_hidden_layers=4))
    # long prompts (> sliding window of 4) with different lengths, so padding and windows matter
    anchor = build_anchor(pair, tiny_texts(6, length=9), None, layer=3, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 4, length=9), batch_size=4, min_relative_gap=0.0)
    components = [*pair.space.everything(), *pair.space.components(kinds=("head",), layers=[0, 1])]
    components += ["L0.attn", "L1.attn.q", "L1.attn.v", "L1.mlp", "L1.mlp.up", "L0.mlp.neuron0", "L1.mlp.neuron3"]
    components += [f"L1.{m}" for m in pair.space.module_names(1) if m.startswith("norm.")]
    fast = ExactScreen(scorer, variants_per_batch=3).run(components, progress=False).frame.set_index("component")
    plain = plain_exact_scores(scorer, components).frame.set_index("component")
    assert len(fast) == len(plain) == len(components)
    assert fast["score"].abs().max() > 0.01  # the pair really differs
    assert fast.loc[[c.name for c in pair.space.components(kinds=("head",), layers=[1])], "score"].abs().min() > 0
    torch.testing.assert_close(
        torch.tensor(fast.loc[plain.index, "score"].values), torch.tensor(plain["score"].values), atol=2e-4, rtol=1e-3
    )
    above = ["norm.final"]
    if not pair.space.aliases:  # untied: the unembedding cannot reach the residual stream
        above.append("unembed")
    assert (fast.loc[above, "score"] == 0).all()


def test_resume_skips_scored_components_and_streams_results(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 4))
    screen = ExactScreen(scorer, variants_per_batch=2)
    streamed = []
    table = screen.run(
        ["L0.mlp", "L1.attn", "L1.attn.head0"], skip={"L1.attn"}, on_result=streamed.append, progress=False
    )
    assert table.components() == ["L0.mlp", "L1.attn.head0"]
    # the streamed rows are the returned rows, and the values equal a run without skipping
    streamed_scores = pd.concat([t.frame for t in streamed]).set_index("component")["score"]
    scores = table.frame.set_index("component")["score"]
    assert streamed_scores.to_dict() == scores.to_dict()
    full = screen.run(["L0.mlp", "L1.attn", "L1.attn.head0"], progress=False).frame.set_index("component")["score"]
    # to float32 round-off, not bit for bit: with the skipped component gone, head0 is stacked with
    # fewer variants, and the anchor block's last-position products then have another shape
    assert scores.to_dict() == pytest.approx(full[["L0.mlp", "L1.attn.head0"]].to_dict(), rel=1e-6)


# measured max |error| against float32 on these scores (llama tiny pair): bfloat16 0.0014,
# float16 0.0002; tolerances are ~4x that, and every score checked is larger than twice its
# tolerance, so a sign flip (or a dropped component) of any score fails
HALF_TOLERANCE = {"bfloat16": 0.006, "float16": 0.001}


@pytest.mark.parametrize("dtype", sorted(HALF_TOLERANCE))
def test_half_precision_weights_score_in_float32_close_to_float32_run(llama_pair_dirs, dtype):
    """bf16/fp16 receivers: anchor projections and effects accumulate in float32/float64."""
    texts = tiny_texts(6, 4)
    components = ["L0.mlp", "L0.attn.head1", "L1.attn", "L1.mlp", "L2"]
    results = {}
    for run in ("float32", dtype):
        pair = load_pair(*llama_pair_dirs, dtype=run)
        assert pair.model.dtype == getattr(torch, run)
        anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
        scorer = AnchorScorer(pair, anchor, texts)
        assert scorer.f_receiver.dtype == torch.float32
        table = ExactScreen(scorer).run(components, progress=False)
        results[run] = torch.tensor(table.frame.set_index("component").loc[components, "score"].values)
    atol = HALF_TOLERANCE[dtype]
    assert results["float32"].abs().min() > 2 * atol
    torch.testing.assert_close(results[dtype], results["float32"], atol=atol, rtol=0)


def test_rows_name_their_method_and_components_above_the_anchor_score_zero_with_no_spread(tmp_path):
    pair = load_pair(*make_pair("llama", tmp_path, scale=0.2, num_layers=4))
    anchor = build_anchor(pair, tiny_texts(4, length=8), None, layer=1, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(5, 4, length=8), batch_size=3)
    names = ["L0.mlp", "L1.attn.head2", "L2.mlp", "L3.attn"]
    fast = ExactScreen(scorer).run(names, progress=False).frame.set_index("component")
    plain = plain_exact_scores(scorer, names).frame.set_index("component")
    assert set(fast["method"]) == set(plain["method"]) == {"exact"}
    above = fast.loc[["L2.mlp", "L3.attn"]]
    assert (above["score"] == 0).all() and (above["stderr"] == 0).all()
    assert (above["n_prompts"] == int(scorer.valid.sum())).all()
    torch.testing.assert_close(
        torch.tensor(fast.loc[names, ["score", "stderr"]].values),
        torch.tensor(plain.loc[names, ["score", "stderr"]].values),
        atol=1e-5,
        rtol=1e-4,
    )


def test_components_the_fine_tune_left_alone_score_exactly_zero(tmp_path):
    """Only the planted neurons (layer 0) and one head (layer 2) differ: every other component scores
    0.0 exactly, in the anchor's own block (run alone) as below it (stacked): the patched runs and the
    receiver's anchor scores compute the anchor block the same way (its last position only)."""
    from test_roles import planted_scorer

    scorer = planted_scorer(tmp_path)
    assert scorer.layer == 2
    untouched = ["L2.attn.head0", "L2.mlp", "L1.attn.head2", "L1.mlp", "L0.attn", "L0.mlp.neuron5"]
    table = ExactScreen(scorer).run([*untouched, "L2.attn.head1"], progress=False).frame.set_index("component")
    assert (table.loc[untouched, "score"] == 0.0).all()
    assert table.loc["L2.attn.head1", "score"] != 0.0
