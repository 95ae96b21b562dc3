"""Forward-pass machinery shared by anchors and scores: tokenized batches, reading the residual
stream after a decoder block, and running only a segment of the layer stack.

The residual stream "at layer l" is the output of decoder block ``l`` (0-based), before any final
norm. Segment runs keep the model's own forward (so each layer gets its own attention mask,
sliding window and rotary inputs, whatever the family): the blocks below ``start`` are swapped for
pass-throughs, the cached input of block ``start`` is injected by a pre-hook, and the pass stops by
exception right after block ``stop``, so nothing above it (or the unembedding) runs. No KV cache is
used anywhere (``use_cache=False``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from weightpatch.components import ComponentSpace
from weightpatch.errors import WeightPatchError, reading
from weightpatch.prompts import PromptRecord

logger = logging.getLogger("weightpatch")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed layer has run."""


@dataclass
class Batch:
    """Left-padded prompts. ``position_ids`` count real tokens only, so a prompt's positions do not
    depend on how much padding its batch needed."""

    input_ids: Int[torch.Tensor, "batch seq"]
    attention_mask: Int[torch.Tensor, "batch seq"]
    position_ids: Int[torch.Tensor, "batch seq"]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def repeat(self, times: int) -> Batch:
        """The batch stacked ``times`` over (variant-major), for running several variants at once."""
        return Batch(*(t.repeat(times, 1) for t in (self.input_ids, self.attention_mask, self.position_ids)))

    def kwargs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def render_prompt(tokenizer, prompt: str, prompt_format: str = "auto") -> str:
    """The text the model sees for a raw ``prompt``. ``prompt_format``: ``"chat"`` through the
    tokenizer's chat template (one user message, generation prompt appended), ``"raw"`` the prompt
    itself, ``"auto"`` chat when the tokenizer has a template, raw otherwise. A leading BOS written
    by the template is dropped, since :func:`encode` adds the tokenizer's special tokens (so both
    paths give the same ids)."""
    if prompt_format not in ("auto", "chat", "raw"):
        raise WeightPatchError(f"unknown prompt format {prompt_format!r}; choose auto, chat or raw")
    if resolve_prompt_format(tokenizer, prompt_format) == "raw":
        return prompt
    with reading(getattr(tokenizer, "name_or_path", "") or "the tokenizer", "chat template"):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    bos = getattr(tokenizer, "bos_token", None)
    adds_bos = bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
    return text[len(bos) :] if adds_bos and text.startswith(bos) else text


def resolve_prompt_format(tokenizer, prompt_format: str = "auto") -> str:
    """``"chat"`` or ``"raw"``: what ``prompt_format`` means for this tokenizer (``"auto"`` is chat
    exactly when it has a chat template). Refuses ``"chat"`` without a template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "raw"
    if prompt_format == "chat" and not has_template:
        raise WeightPatchError("prompt format 'chat' but the tokenizer has no chat template; use --prompt-format raw")
    return prompt_format


def render_prompts(tokenizer, prompts: Sequence[str], prompt_format: str = "auto") -> list[str]:
    return [render_prompt(tokenizer, p, prompt_format) for p in prompts]


def model_texts(tokenizer, prompts: Sequence[str | PromptRecord], render: str | None = None) -> list[str]:
    """The texts an engine runs: prompt records (their ``prompt``) rendered as every pipeline stage
    renders them (``render``, default ``"auto"``: :func:`render_prompts`); plain strings rendered with
    an explicit ``render`` (``"raw"``: as they are), or, without one, taken as already rendered, with
    a warning when the tokenizer has a chat template that none of them carries (raw prompts where a
    stage would apply the template: the anchor layer and every score would differ from the stage's)."""
    records = [p for p in prompts if isinstance(p, PromptRecord)]
    texts = [p.prompt if isinstance(p, PromptRecord) else p for p in prompts]
    if records and render is None:
        render = "auto"
    if render is not None:
        return render_prompts(tokenizer, texts, render)
    if texts and resolve_prompt_format(tokenizer, "auto") == "chat":
        opening = render_prompt(tokenizer, "\x00", "chat").split("\x00")[0]
        if opening.strip() and not any(t.startswith(opening) for t in texts):
            logger.warning(
                "%d texts without the chat template the pipeline applies: pass prompt records, render='auto' "
                "(as the stages render), or render='raw' to use them as they are",
                len(texts),
            )
    return texts


_UNSET_LENGTH = 10**9  # tokenizers without a limit report a huge sentinel (int(1e30))


def context_length(model: torch.nn.Module, tokenizer) -> int | None:
    """The longest input (tokens) the model is made for: the smaller of its config's
    ``max_position_embeddings`` and the tokenizer's ``model_max_length``, ignoring unset values;
    ``None`` when neither is set."""
    limits = (getattr(getattr(model, "config", None), "max_position_embeddings", None), tokenizer.model_max_length)
    real = [int(x) for x in limits if isinstance(x, int) and 0 < x < _UNSET_LENGTH]
    return min(real) if real else None


def encode(
    tokenizer,
    texts: Sequence[str],
    device: torch.device | str = "cpu",
    max_length: int | None = None,
    truncate: bool = False,
) -> Batch:
    """Tokenize model-ready texts (see :func:`render_prompts`) with left padding, so the last column
    is every prompt's last token.

    Prompts longer than ``max_length`` tokens (see :func:`context_length`) are refused with the
    count, or with ``truncate`` cut to their last ``max_length`` tokens (the end, where the anchor
    is read, is kept; the beginning is dropped)."""
    if not texts:
        raise WeightPatchError("no prompts to encode")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise WeightPatchError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=True)
    finally:
        tokenizer.padding_side = previous_side
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(-1)
    if max_length is not None and int(lengths.max()) > max_length:
        too_long = int((lengths > max_length).sum())
        if not truncate:
            raise WeightPatchError(
                f"{too_long} of {len(texts)} prompts are longer than the model's context of {max_length} tokens "
                f"(longest: {int(lengths.max())}); shorten them, or choose truncation to keep their last "
                f"{max_length} tokens"
            )
        logger.warning("%d prompts cut to their last %d tokens (the model's context)", too_long, max_length)
        ids, mask = ids[:, -max_length:], mask[:, -max_length:]  # left padding: the last columns are the ends
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), mask.to(device), positions.to(device))


def batches(batch: Batch, size: int) -> Iterator[Batch]:
    for i in range(0, len(batch), size):
        yield Batch(*(t[i : i + size] for t in (batch.input_ids, batch.attention_mask, batch.position_ids)))


class _PassThrough(torch.nn.Module):
    """Stands in for a skipped decoder block: returns its input."""

    def __init__(self, replaced: torch.nn.Module) -> None:
        super().__init__()
        for attr in ("attention_type", "layer_idx"):
            if hasattr(replaced, attr):
                setattr(self, attr, getattr(replaced, attr))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def decoder_layers(model: torch.nn.Module, space: ComponentSpace) -> torch.nn.ModuleList:
    return model.get_submodule(space.layers_path)  # type: ignore[return-value]


def first_tensor(output: torch.Tensor | tuple) -> torch.Tensor:
    """A module's output tensor (decoder blocks and attention modules return tuples)."""
    return output[0] if isinstance(output, tuple) else output


def _last_position_only(module: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that make a position-wise ``module`` (an MLP, an attention output projection) compute
    its last position only: its input ``(batch, seq, d)`` is cut to ``(batch, 1, d)`` and its output
    broadcast back to ``seq`` positions (a view), so every position of the output holds the last
    position's value. Only what the last position of the block output needs stays exact."""
    seq_len: list[int] = []

    def cut(_module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3:
            seq_len.append(args[0].shape[1])
            return (args[0][:, -1:], *args[1:])
        return None

    def broadcast(_module, _args, output):
        if not seq_len:
            return None
        n = seq_len.pop()
        if isinstance(output, tuple):
            return (output[0].expand(-1, n, -1), *output[1:])
        return output.expand(-1, n, -1)

    return [module.register_forward_pre_hook(cut), module.register_forward_hook(broadcast)]


def run_segment(
    model: torch.nn.Module,
    space: ComponentSpace,
    batch: Batch,
    stop: int,
    start: int = 0,
    hidden_in: Float[torch.Tensor, "batch seq hidden"] | None = None,
    capture_inputs: Sequence[int] = (),
    last_position: bool = False,
) -> tuple[Float[torch.Tensor, "batch seq hidden"], dict[int, torch.Tensor]]:
    """Run blocks ``start..stop`` and return the output of block ``stop`` (the residual stream at
    layer ``stop``), plus the inputs of the blocks listed in ``capture_inputs``.

    With ``start > 0``, ``hidden_in`` is the input of block ``start`` (as cached from an earlier
    run on the same batch); the blocks below are not run. Gradients flow if enabled by the caller.

    ``last_position``: only the last position of the output is wanted (an anchor score reads
    nothing else), so block ``stop`` runs its MLP and its attention output projection on the last
    position only (the earlier positions' keys and values still come from every position); the
    output is then ``(batch, 1, hidden)``. Its values agree with the full run's last position to
    float round-off (the matrix products have another shape), not bit for bit.
    """
    if start > 0 and hidden_in is None:
        raise ValueError("a segment that starts above layer 0 needs the input of its first layer")
    layers = decoder_layers(model, space)
    originals = {i: layers[i] for i in range(start)}
    captured: dict[int, torch.Tensor] = {}
    result: list[torch.Tensor] = []
    handles = []

    def inject(_module, args, kwargs):
        if args:
            return (hidden_in, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden_in}

    def make_capture(i):
        def capture(_module, args, kwargs):
            captured[i] = args[0] if args else kwargs["hidden_states"]

        return capture

    def stop_here(_module, _args, output):
        result.append(first_tensor(output))
        raise _StopForward

    try:
        for i in originals:
            layers[i] = _PassThrough(originals[i])
        for i in capture_inputs:
            handles.append(layers[i].register_forward_pre_hook(make_capture(i), with_kwargs=True))
        if start > 0:
            handles.append(layers[start].register_forward_pre_hook(inject, with_kwargs=True))
        handles.append(layers[stop].register_forward_hook(stop_here))
        if last_position:  # the MLP, and the head-output module (whose input is every head's output)
            for module in (space.module_path(stop, "mlp"), space.site(f"L{stop}.attn.head0").module):
                handles += _last_position_only(model.get_submodule(module))
        with suppress(_StopForward):
            model(**batch.kwargs(), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for i, layer in originals.items():
            layers[i] = layer
    return (result[0][:, -1:] if last_position else result[0]), captured


def run_head(
    model: torch.nn.Module,
    space: ComponentSpace,
    batch: Batch,
    hidden: Float[torch.Tensor, "batch seq hidden"],
) -> Float[torch.Tensor, "batch seq vocab"]:
    """The model's logits when the last decoder block outputs ``hidden``: the family's own final
    norm, unembedding and logit soft-capping applied to it (the model's forward runs with every
    block skipped and the last block's output replaced, so nothing family-specific is re-written
    here). ``batch`` gives the attention mask and positions of ``hidden``'s rows."""
    layers = decoder_layers(model, space)
    originals = list(layers)
    try:
        for i, layer in enumerate(originals):
            layers[i] = _PassThrough(layer)
        handle = layers[len(originals) - 1].register_forward_hook(lambda _m, _a, _out: hidden)
        try:
            return model(**batch.kwargs(), use_cache=False).logits
        finally:
            handle.remove()
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


@contextmanager
def residual_addition(
    model: torch.nn.Module, space: ComponentSpace, layer: int, vector: Float[torch.Tensor, " hidden"]
) -> Iterator[None]:
    """Add ``vector`` to the residual stream after block ``layer`` at every position (steering)."""
    block = decoder_layers(model, space)[layer]

    def add(_module, _args, output):
        if isinstance(output, tuple):
            return (output[0] + vector.to(output[0].dtype), *output[1:])
        return output + vector.to(output.dtype)

    handle = block.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()
