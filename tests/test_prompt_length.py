"""Prompts longer than the model's context are refused with the count, or cut by explicit choice."""

import pytest

from conftest import make_pair, tiny_texts
from weightpatch.anchors import build_anchor
from weightpatch.errors import WeightPatchError
from weightpatch.pair import load_pair
from weightpatch.runner import context_length, encode
from weightpatch.scoring import AnchorScorer


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return load_pair(*make_pair("llama", tmp_path_factory.mktemp("pair")))  # max_position_embeddings=64


def _long(n_tokens: int) -> str:
    return " ".join("abcdefghij"[i % 10] for i in range(n_tokens))


def test_context_length_is_the_smaller_real_limit(pair):
    assert pair.tokenizer.model_max_length > 10**20  # unset: transformers' sentinel, ignored
    assert context_length(pair.model, pair.tokenizer) == 64
    pair.tokenizer.model_max_length = 40
    try:
        assert context_length(pair.model, pair.tokenizer) == 40
    finally:
        pair.tokenizer.model_max_length = int(1e30)


def test_too_long_prompts_are_refused_with_the_count(pair):
    texts = [*tiny_texts(3), _long(200), _long(90)]
    n_long = encode(pair.tokenizer, texts).attention_mask.sum(-1).max()
    with pytest.raises(WeightPatchError, match=rf"2 of 5 prompts are longer than the model's context of 64 tokens "
                       rf"\(longest: {int(n_long)}\)"):  # fmt: skip
        build_anchor(pair, texts, None, layer=1, method="model_diff")
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    with pytest.raises(WeightPatchError, match="2 of 5 prompts are longer"):
        AnchorScorer(pair, anchor, texts)


def test_truncation_keeps_each_prompts_last_tokens(pair):
    texts = [*tiny_texts(2), _long(200)]
    full = encode(pair.tokenizer, texts)
    cut = encode(pair.tokenizer, texts, max_length=64, truncate=True)
    assert cut.input_ids.shape == (3, 64)
    assert cut.input_ids.tolist() == full.input_ids[:, -64:].tolist()
    assert cut.position_ids[2].tolist() == list(range(64))  # positions restart inside the context
    short = encode(pair.tokenizer, texts[:2])
    for i in range(2):  # short prompts are untouched (same tokens, same positions)
        n = int(short.attention_mask[i].sum())
        assert cut.input_ids[i, -n:].tolist() == short.input_ids[i, -n:].tolist()
        assert cut.position_ids[i, -n:].tolist() == list(range(n))
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    scorer = AnchorScorer(pair, anchor, texts, truncate_prompts=True)
    assert scorer.batches[0].input_ids.shape[1] == 64
