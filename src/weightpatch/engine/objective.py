"""What a sweep reads off each patched model: the objective, and the block runs every method shares.

An :class:`Objective` says how far a variant must run and how to turn the residual stream there
into one number per prompt, and how to normalize a variant's numbers into an effect:

- ``stop``: the last decoder block that must run (the anchor layer; the behaviour objective, which
  reads the model's output, stops at the last block and applies the final norm and unembedding in
  its readout);
- ``last_position``: only the last position of block ``stop``'s output is read (the anchor score),
  so that block computes its MLP and attention output projection there alone
  (:func:`~weightpatch.runner.run_segment` ``last_position``);
- :meth:`Objective.readout`: (rows, seq, hidden) at ``stop`` -> (rows,) for the prompts of batch
  ``batch_index`` (stacked variants are variant-major: row ``v * batch + i`` is prompt ``i`` of
  variant ``v``);
- :meth:`Objective.reads_weights`: the components whose weights the readout itself uses (none for
  the anchor; the final norm and unembedding for the behaviour objective), run the plain way;
- :meth:`Objective.effect`: a variant's readouts on every prompt (prompt,) -> an
  :class:`~weightpatch.scoring.Effect` (mean, standard error, prompt count), with ``reference``
  the receiver's readouts (the effect of "no patch").

:class:`~weightpatch.scoring.AnchorScorer` is the anchor objective,
:class:`~weightpatch.behaviour.BehaviourScorer` the behaviour objective. :func:`run_blocks` runs a
segment of the receiver's blocks from the cached input of its first block (or from the
embedding), the one place that knows where a segment's input comes from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from jaxtyping import Float

from weightpatch.runner import Batch, run_segment

if TYPE_CHECKING:
    from weightpatch.components import Component
    from weightpatch.pair import ModelPair
    from weightpatch.scoring import Effect


class Objective(Protocol):
    """The readout a sweep scores variants by (see the module docstring)."""

    pair: ModelPair
    batches: list[Batch]

    @property
    def reference(self) -> Float[torch.Tensor, " prompt"]:
        """The receiver's readout on every prompt."""
        ...

    @property
    def valid(self) -> torch.Tensor:
        """(prompt,) bool: the prompts that count in an effect."""
        ...

    @property
    def stop(self) -> int: ...

    @property
    def last_position(self) -> bool: ...

    def readout(self, hidden: Float[torch.Tensor, "rows seq hidden"], batch_index: int) -> torch.Tensor: ...

    def effect(self, values: Float[torch.Tensor, " prompt"]) -> Effect: ...

    def block_inputs(self, top: int | None = None) -> list[dict[int, torch.Tensor]]: ...

    def reads_weights(self, component: Component | str) -> bool:
        """Whether :meth:`readout` itself uses the component's weights (the behaviour objective's
        head: final norm, unembedding); such a variant keeps its patch through the readout."""
        ...

    def values(self, model: torch.nn.Module) -> Float[torch.Tensor, " prompt"]:
        """The readout of a whole forward of ``model`` on every prompt (the plain way)."""
        ...


def run_blocks(
    objective: Objective,
    batch_index: int,
    start: int,
    stop: int | None = None,
    hidden: Float[torch.Tensor, "rows seq hidden"] | None = None,
    variants: int = 1,
    last_position: bool | None = None,
    model: torch.nn.Module | None = None,
) -> Float[torch.Tensor, "rows seq hidden"]:
    """The output of block ``stop`` (default: the objective's) after running blocks ``start..stop``
    of ``model`` (default: the pair's receiver, with whatever is patched into it) on prompt batch
    ``batch_index`` stacked ``variants`` times (variant-major).

    The input of block ``start`` is ``hidden`` ((variants * batch, seq, hidden)) when given, else
    the receiver's cached input of block ``start`` repeated ``variants`` times (the embedding for
    ``start = 0``). ``last_position`` (default: ``stop`` is the objective's stop and it reads the
    last position only) cuts block ``stop`` to the last position: the output is then (rows, 1,
    hidden)."""
    stop = objective.stop if stop is None else stop
    if last_position is None:
        last_position = stop == objective.stop and objective.last_position
    batch = objective.batches[batch_index]
    if hidden is None and start > 0:
        hidden = objective.block_inputs()[batch_index][start]
        hidden = hidden.repeat(variants, 1, 1) if variants > 1 else hidden
    pair = objective.pair
    return run_segment(
        model if model is not None else pair.model,
        pair.space,
        batch.repeat(variants) if variants > 1 else batch,
        stop=stop,
        start=start,
        hidden_in=hidden,
        last_position=last_position,
    )[0]


def readout_variants(
    objective: Objective, outputs: list[Float[torch.Tensor, "rows seq hidden"]], variants: int
) -> Float[torch.Tensor, "variant prompt"]:
    """Each variant's readout on every prompt from the stacked outputs at ``stop`` of every prompt
    batch (one tensor per batch, variant-major)."""
    rows = [objective.readout(out, bi).view(variants, len(objective.batches[bi])) for bi, out in enumerate(outputs)]
    return torch.cat(rows, dim=1)
