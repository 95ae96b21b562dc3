"""Greedy generation helpers: render prompts the way the model was trained, generate, decode responses.

Prompts are rendered and encoded exactly as anchors and scores see them
(:func:`weightpatch.runner.render_prompts`, :func:`weightpatch.runner.encode`): through the chat
template when the tokenizer has one (``prompt_format="auto"``), left-padded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightpatch.errors import WeightPatchError
from weightpatch.runner import encode, render_prompts


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 160,
    batch_size: int = 64,
    prompt_format: str = "auto",
) -> list[str]:
    """Greedy responses to ``prompts`` (decoded, prompt and special tokens removed), in order.

    Generation stops at the tokenizer's eos token (or after ``max_new_tokens``).
    """
    if max_new_tokens < 1:
        raise WeightPatchError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            batch = encode(tokenizer, render_prompts(tokenizer, chunk, prompt_format), device)
            enc = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            generated = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def load_model(path, dtype: torch.dtype = torch.float32):
    """``AutoModelForCausalLM`` and ``AutoTokenizer`` from a local directory, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, tokenizer
