"""Greedy generation: chat-template rendering, left padding, eos stopping, decoded responses only."""

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from weightpatch import demo
from weightpatch.errors import WeightPatchError
from weightpatch.generation import generate, load_model
from weightpatch.runner import encode


@pytest.fixture(scope="module")
def specialized():
    return load_model(demo.paths().specialized)


def test_batched_equals_single_and_stops_at_eos(specialized):
    model, tok = specialized
    prompts = [
        "Write a short essay about the lake.",
        "Tell me a paragraph about the city. Wrap your entire response with double quotation marks.",
    ]
    batched = generate(model, tok, prompts, max_new_tokens=80)
    single = [generate(model, tok, [p], max_new_tokens=80)[0] for p in prompts]
    assert batched == single
    for response in batched:
        assert "<|assistant|>" not in response and "</s>" not in response and "<pad>" not in response
        assert response.strip()
    # stopped at eos well before the budget: a short response
    assert len(tok(batched[0], add_special_tokens=False)["input_ids"]) < 80


def test_max_new_tokens_bounds_length(specialized):
    model, tok = specialized
    (response,) = generate(model, tok, ["Write a short essay about the lake."], max_new_tokens=3)
    assert len(tok(response, add_special_tokens=False)["input_ids"]) <= 3
    with pytest.raises(WeightPatchError):
        generate(model, tok, ["x"], max_new_tokens=0)


def test_without_chat_template_tiny_model():
    model = tiny_model("llama")
    tok = tiny_tokenizer(model.config.vocab_size)
    model.generation_config.pad_token_id = tok.pad_token_id
    out = generate(model, tok, ["w5 w6 w7", "w9"], max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert not model.training
    expected = tok(["w5"], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(encode(tok, ["w5"]).input_ids, expected)
