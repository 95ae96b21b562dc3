"""Greedy generation helpers: render prompts the way the model was trained, generate, decode responses.

Prompts are rendered and encoded exactly as anchors and scores see them
(:func:`weightpatch.runner.render_prompts`, :func:`weightpatch.runner.encode`): through the chat
template when the tokenizer has one (``prompt_format="auto"``), left-padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from weightpatch.errors import WeightPatchError
from weightpatch.loading import load_model as load
from weightpatch.runner import encode, render_prompts


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 160,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy continuations of model-ready ``texts`` (already rendered, see
    :func:`weightpatch.runner.render_prompts`) as token ids, in order: everything the model wrote up
    to and including its first eos token (or ``max_new_tokens`` tokens), padding removed."""
    if max_new_tokens < 1:
        raise WeightPatchError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = encode(tokenizer, list(texts[start : start + batch_size]), device)
            enc = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            generated = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in generated[:, enc["input_ids"].shape[1] :].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id) + 1]
                out.append(row)
    finally:
        model.train(was_training)
    return out


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
    texts = render_prompts(tokenizer, prompts, prompt_format)
    ids = generate_ids(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def load_model(path, dtype: torch.dtype = torch.float32, **options: Any):
    """A model (eval mode, parameters trainable) and its tokenizer through the one loader,
    :func:`weightpatch.loading.load_model` (``revision=``, ``gguf_file=``, an adapter with ``base=``,
    the remote-code refusal unless ``trust_remote_code=True``; pass ``frozen=True`` to drop gradients)."""
    return load(path, dtype=dtype, **{"frozen": False, **options})
