"""Score sources for mechanism-aware merging: a per-component importance table for one expert, from
Weight Patching (a score table, :func:`weightpatch.pipeline.merge.read_scores`) or computed here from
the weights, the data or a seed, at any granularity the component space knows (``kinds``: modules,
heads, neurons, ...). Every table is ``{component name: score}``, the input of the merge rules in
:mod:`weightpatch.merging.mechanism` (registered in :data:`weightpatch.merging.registry.SCORE_SOURCES`).

``magnitude``  ``s(c) = ||delta restricted to c's entries||_2`` with ``delta = expert - base`` (no data).
``snip``       ``s(c) = sum over c's entries of |theta * dL/dtheta|``, the SNIP saliency of the expert
               on its own texts (LED-Merging, arXiv 2502.16770), ``L`` the mean next-token loss.
``random``     ``s(c) ~ U[0, 1)`` drawn in the space's component order from ``random.Random(seed)``:
               the control with no information, reproducible for a seed.

A component's entries are the union of its parameter slices (a head: its query rows and output
columns; a neuron: its up/gate rows and down column), as the merge rules use them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from weightpatch.components import ComponentSpace, ParamSlice
from weightpatch.errors import WeightPatchError
from weightpatch.merging.mechanism import slice_regions

DEFAULT_KINDS: tuple[str, ...] = ("head", "neuron")


def _component_names(space: ComponentSpace, kinds: Iterable[str]) -> list[str]:
    names = [c.name for c in space.components(tuple(kinds))]
    if not names:
        raise WeightPatchError(f"the model has no components of kinds {', '.join(kinds)}")
    return names


def slice_sums(
    space: ComponentSpace, components: Sequence[str], entry_values: Callable[[str], torch.Tensor]
) -> dict[str, float]:
    """``sum`` of ``entry_values(parameter)`` over each component's entries; ``entry_values`` is
    called once per parameter (canonical name) that some component touches."""
    by_param: dict[str, list[tuple[str, ParamSlice]]] = {}
    for comp in components:
        for sl in space.resolve(comp):
            by_param.setdefault(sl.name, []).append((comp, sl))
    totals = dict.fromkeys(components, 0.0)
    for name, pieces in by_param.items():
        values = entry_values(name)
        for comp, sl in pieces:
            totals[comp] += float(sum(r.sum() for r in slice_regions(values, sl)))
    return totals


def magnitude_scores(
    space: ComponentSpace, base: Any, expert: Any, kinds: Iterable[str] = DEFAULT_KINDS
) -> dict[str, float]:
    """``||delta||_2`` over each component's entries; ``base``/``expert``: anything with
    ``get(name) -> tensor`` (a :class:`~weightpatch.merging.stream.Checkpoint`) or a state dict."""
    get_base, get_expert = _getter(base), _getter(expert)

    def squared_delta(name: str) -> torch.Tensor:
        return (get_expert(name).double() - get_base(name).double()).square()

    sums = slice_sums(space, _component_names(space, kinds), squared_delta)
    return {c: v**0.5 for c, v in sums.items()}


def _getter(source: Any) -> Callable[[str], torch.Tensor]:
    return source.get if hasattr(source, "get") and not isinstance(source, dict) else source.__getitem__


def snip_gradients(model: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 8) -> dict[str, Any]:
    """``|theta * dL/dtheta|`` per parameter (named as ``model.named_parameters``), ``L`` the mean
    next-token loss over ``texts`` (model-ready strings, every non-pad token a target), accumulated
    in batches of ``batch_size``."""
    if not texts:
        raise WeightPatchError("SNIP scores need at least one text of the expert's data")
    from weightpatch.runner import encode

    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    try:
        for chunk in batches:
            batch = encode(tokenizer, chunk, device)
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
            (loss / len(batches)).backward()
        out = {}
        for name, p in model.named_parameters():
            out[name] = (p.detach() * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return out


def snip_scores(
    space: ComponentSpace,
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    kinds: Iterable[str] = DEFAULT_KINDS,
    batch_size: int = 8,
) -> dict[str, float]:
    """SNIP saliency of each component of the expert ``model`` on ``texts`` (module docstring)."""
    saliency = snip_gradients(model, tokenizer, texts, batch_size)
    aliases = {space.aliases.get(n, n): n for n in saliency}
    return slice_sums(space, _component_names(space, kinds), lambda name: saliency[aliases.get(name, name)])


def random_scores(space: ComponentSpace, seed: int | str, kinds: Iterable[str] = DEFAULT_KINDS) -> dict[str, float]:
    """``U[0, 1)`` per component, in the space's component order, from ``random.Random(seed)``."""
    rng = random.Random(seed)
    return {c: rng.random() for c in _component_names(space, kinds)}
