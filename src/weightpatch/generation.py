"""Greedy generation helpers: render prompts the way the model was trained, generate, decode responses.

Prompts are rendered with the tokenizer's chat template when it has one (one user message, generation
prompt appended), and tokenized without adding special tokens again; without a chat template the raw
prompt is tokenized with the tokenizer's own special tokens. Batches are left-padded, so the last
prompt token of every row sits at position -1 (what anchors read).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightpatch.errors import WeightPatchError


def render_prompt(tokenizer, prompt: str, use_chat_template: bool | None = None) -> tuple[str, bool]:
    """The text fed to the model for ``prompt`` and whether special tokens must still be added.

    ``use_chat_template=None`` uses the template when the tokenizer has one.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
        use_chat_template = has_template
    if use_chat_template:
        if not has_template:
            raise WeightPatchError("use_chat_template=True but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return text, False
    return prompt, True


def encode_prompts(tokenizer, prompts: Sequence[str], use_chat_template: bool | None = None):
    """Left-padded ``input_ids`` / ``attention_mask`` tensors for a batch of prompts."""
    if not prompts:
        raise WeightPatchError("no prompts to encode")
    rendered = [render_prompt(tokenizer, p, use_chat_template) for p in prompts]
    add_special = rendered[0][1]
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise WeightPatchError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(
            [text for text, _ in rendered], return_tensors="pt", padding=True, add_special_tokens=add_special
        )
    finally:
        tokenizer.padding_side = old_side


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 160,
    batch_size: int = 64,
    use_chat_template: bool | None = None,
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
            enc = encode_prompts(tokenizer, chunk, use_chat_template)
            enc = {k: v.to(device) for k, v in enc.items()}
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
