"""Prompt rendering and encoding, and segment runs of the layer stack."""

import pytest
import torch

from conftest import FAMILIES, tiny_model, tiny_tokenizer, token_batch
from weightpatch import demo
from weightpatch.components import ComponentSpace
from weightpatch.errors import WeightPatchError
from weightpatch.generation import load_model
from weightpatch.runner import Batch, encode, render_prompt, run_segment


@pytest.fixture(scope="module")
def specialized():
    return load_model(demo.paths().specialized)


def test_render_uses_chat_template(specialized):
    _, tok = specialized
    text = render_prompt(tok, "Tell me about the river.")
    assert text == "<|user|>Tell me about the river.<|assistant|>"  # encode adds the BOS
    ids = encode(tok, [text]).input_ids[0].tolist()
    assert ids == tok("<s><|user|>Tell me about the river.<|assistant|>", add_special_tokens=False)["input_ids"]
    assert render_prompt(tok, "hi", "raw") == "hi" and render_prompt(tok, "hi", "chat") == render_prompt(tok, "hi")


def test_render_without_template_raises_when_forced():
    with pytest.raises(WeightPatchError, match="chat template"):
        render_prompt(tiny_tokenizer(), "w5", "chat")


@pytest.mark.parametrize("side", ["left", "right"])
def test_left_padding(specialized, side):
    _, tok = specialized
    tok.padding_side = side
    enc = encode(tok, ["Tell me about the river.", "Write a short essay about the old city bridge."])
    assert enc.attention_mask[0, 0] == 0 and enc.attention_mask[0, -1] == 1  # row 0 is padded left
    assert enc.input_ids[0, 0] == tok.pad_token_id
    assert enc.position_ids[0, -1] == enc.position_ids[1, -1] - (enc.attention_mask[0] == 0).sum()
    assert tok.padding_side == side  # the tokenizer's own setting is restored


@pytest.mark.parametrize("family", FAMILIES)
def test_segment_from_a_cached_input_equals_the_full_run(family):
    """Skipped blocks are pass-throughs inside the model's own forward: the output of block 2 from the
    cached input of block 1 equals the full run's, per-layer masks and rotary inputs included."""
    model = tiny_model(family)
    space = ComponentSpace.from_model(model)
    ids = token_batch(n=3, length=12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on one row
    batch = Batch(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        full, inputs = run_segment(model, space, batch, stop=2, capture_inputs=[1])
        resumed, _ = run_segment(model, space, batch, stop=2, start=1, hidden_in=inputs[1])
    torch.testing.assert_close(resumed, full, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the input"):
        run_segment(model, space, batch, stop=2, start=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_last_position_run_equals_the_full_runs_last_position(family):
    """With ``last_position`` the stop block's MLP and attention output projection see one position
    only, and the output (the last position) equals the full run's to float round-off; blocks below
    the stop block and later runs see every position."""
    model = tiny_model(family)
    space = ComponentSpace.from_model(model)
    ids = token_batch(n=3, length=12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    batch = Batch(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
    seen: dict[str, list[int]] = {}
    paths = {
        "stop mlp": space.module_path(2, "mlp"),
        "stop o_proj": f"{space.layer_path(2)}.{space.spec.sites.head_output}",
        "lower mlp": space.module_path(1, "mlp"),
    }
    hooks = [
        model.get_submodule(path).register_forward_hook(  # sees the arguments forward got
            lambda _m, args, _out, key=key: seen.setdefault(key, []).append(args[0].shape[1])
        )
        for key, path in paths.items()
    ]
    with torch.no_grad():
        full, inputs = run_segment(model, space, batch, stop=2, capture_inputs=[1])
        last, _ = run_segment(model, space, batch, stop=2, last_position=True)
        resumed, _ = run_segment(model, space, batch, stop=2, start=1, hidden_in=inputs[1], last_position=True)
        again, _ = run_segment(model, space, batch, stop=2)
    for h in hooks:
        h.remove()
    assert last.shape == (3, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(resumed, full[:, -1:], atol=1e-6, rtol=1e-5)
    assert torch.equal(again, full)
    assert seen["stop mlp"] == [12, 1, 1, 12] and seen["stop o_proj"] == [12, 1, 1, 12]
    assert seen["lower mlp"] == [12, 12, 12, 12]
