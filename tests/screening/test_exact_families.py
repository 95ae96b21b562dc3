"""The truncated exact screen against the plain full forward on every family, with the anchor two
or more blocks above the patched components, so the stacked-variant path (blocks ``l+1..anchor``
run once for all variants of a layer) is taken with several blocks between component and anchor."""

import pytest
import torch

from conftest import FAMILIES, make_pair, tiny_texts
from weightpatch.anchors import build_anchor
from weightpatch.pair import load_pair
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen, plain_exact_scores

ANCHOR_LAYER = 3


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_blocks_up_to_a_distant_anchor_equal_the_plain_forward(family, tmp_path):
    pair = load_pair(*make_pair(family, tmp_path, scale=0.2, num_layers=4))
    # prompts longer than the sliding window of 4, of different lengths: padding and windows matter
    anchor = build_anchor(pair, tiny_texts(6, length=9), None, layer=ANCHOR_LAYER, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(5, 4, length=9), batch_size=3, min_relative_gap=0.0)
    # L1 components run blocks 2..3 stacked (two blocks), L2 components block 3; several variants
    # of one layer share a stacked batch (variants_per_batch=3 splits the L1 group unevenly)
    components = ["L1", "L1.attn", "L1.mlp", "L1.attn.head0", "L1.attn.head3", "L1.mlp.neuron2", "L1.attn.q"]
    components += ["L2.mlp", "L2.attn.head1", "L0.mlp", "L3.attn"]
    fast = ExactScreen(scorer, variants_per_batch=3).run(components, progress=False).frame.set_index("component")
    plain = plain_exact_scores(scorer, components).frame.set_index("component")
    assert fast.loc[["L1", "L1.attn", "L1.mlp"], "score"].abs().max() > 0.05  # the pair really differs
    torch.testing.assert_close(
        torch.tensor(fast.loc[components, "score"].values),
        torch.tensor(plain.loc[components, "score"].values),
        atol=2e-4,
        rtol=1e-3,
    )
