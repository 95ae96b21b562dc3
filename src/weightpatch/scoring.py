"""Anchor scores and the source-level effect (docs/method.md, "Scores: the gap and the source-level effect").

For a prompt x, with the receiver R (normally the base) and the donor D (normally specialized):

    F(M, x)   = <h_layer(M, x)[last], u>                      (anchor score)
    G(x)      = F(D, x) - F(R, x)                             (the gap)
    E(C)      = mean_x [ (F(R^(C <- D), x) - F(R, x)) / G(x) ] (fraction of the gap recovered)

``E = 1`` means the patch moves the anchor all the way to the donor's value, ``0`` means no
change; negative values move it away. In knockout runs (receiver = specialized) the same formula
gives the fraction of the gap *removed* by putting base weights in.

Tiny gaps: prompts whose ``|G(x)|`` is below ``min_relative_gap`` times the median ``|G|`` are
excluded from every mean (their count is reported as :attr:`AnchorScorer.n_excluded`), never
divided by silently. If every prompt's gap is tiny, :class:`AnchorScorer` refuses to score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float

from weightpatch.anchors import Anchor
from weightpatch.components import Component
from weightpatch.errors import WeightPatchError
from weightpatch.pair import ModelPair, Role
from weightpatch.prompts import PromptRecord
from weightpatch.runner import Batch, batches, context_length, encode, model_texts, run_segment

logger = logging.getLogger("weightpatch")


@dataclass(frozen=True)
class Effect:
    """A normalized effect: mean over valid prompts, its standard error, and the prompt count."""

    mean: float
    stderr: float
    n_prompts: int


class GapScorer:
    """The normalization every objective shares: a per-prompt readout ``F(M, x)`` of a model, the
    receiver's and donor's values, the gap ``G(x) = F(donor, x) - F(receiver, x)``, the prompts whose
    gap is too small to divide by, and :meth:`effect` (0 = receiver, 1 = donor).

    A subclass sets ``pair``, ``texts`` and ``batches`` (the batches :meth:`forward_values` reads)
    and implements :meth:`forward_values`; :meth:`measure_references` then fills in the rest. The anchor
    objective is :class:`AnchorScorer`; the behaviour objective is
    :class:`weightpatch.behaviour.BehaviourScorer`.
    """

    objective = "anchor"
    separation_subject = "the anchor"  # what a refusal says does not separate the models
    separation_fix = " or rebuild the anchor"
    pair: ModelPair
    texts: list[str]
    batches: list[Batch]

    def forward_values(self, model: torch.nn.Module, batch: Batch) -> Float[torch.Tensor, " batch"]:
        """F(model, x) of each prompt of one batch, with the model's current weights
        (differentiable: first-order scores backpropagate through it)."""
        raise NotImplementedError

    def values(self, model: torch.nn.Module) -> Float[torch.Tensor, " prompt"]:
        """F(model, x) for every prompt, with the model's current weights."""
        with torch.no_grad():
            return torch.cat([self.forward_values(model, b) for b in self.batches])

    @property
    def value_dtype(self) -> torch.dtype:
        """Scores accumulate in float32 (float64 for float64 models, e.g. finite-difference checks)."""
        return torch.float64 if self.pair.model.dtype == torch.float64 else torch.float32

    def measure_references(self, min_relative_gap: float) -> None:
        """Run the receiver and the donor once: ``f_receiver``, ``f_donor``, ``gap``, ``valid`` and
        ``n_excluded``; refuses non-finite values and a set where every gap is tiny."""
        self.f_receiver = self.values(self.pair.model)
        donor_role: Role = "specialized" if self.pair.receiver == "base" else "base"
        with self.pair.as_model(donor_role, streamed=True) as donor_model:
            self.f_donor = self.values(donor_model)
        self.gap = self.f_donor - self.f_receiver
        if not torch.isfinite(self.gap).all():
            raise WeightPatchError(
                f"{self.objective} scores contain NaN/inf: check the model weights and dtype (try float32)"
            )
        threshold = min_relative_gap * self.gap.abs().median()
        self.valid = self.gap.abs() > threshold
        self.n_excluded = int((~self.valid).sum())
        if self.n_excluded:
            logger.warning(
                "%d of %d prompts have %s gap below %g x the median and are excluded from every mean",
                self.n_excluded,
                len(self.texts),
                "an anchor" if self.objective == "anchor" else f"a {self.objective}",
                min_relative_gap,
            )
        if not self.valid.any():
            raise WeightPatchError(
                f"{self.separation_subject} does not separate the two models on these prompts (every gap is ~0); "
                f"use prompts that exercise the capability{self.separation_fix}"
            )

    # ---- shared by the objectives of the sweep engine (weightpatch.engine.objective.Objective) ----
    f_receiver: Float[torch.Tensor, " prompt"]
    valid: torch.Tensor  # (prompt,) bool: the prompts that count in an effect
    last_position = False  # whether the readout reads the last position of block ``stop`` only
    _block_inputs: list[dict[int, torch.Tensor]] | None = None
    _block_inputs_top = -1

    @property
    def stop(self) -> int:
        """The last decoder block a variant runs before :meth:`readout`."""
        raise NotImplementedError

    @property
    def reference(self) -> Float[torch.Tensor, " prompt"]:
        """The receiver's readout on every prompt (``F_receiver``)."""
        return self.f_receiver

    def readout(self, hidden: Float[torch.Tensor, "rows seq hidden"], batch_index: int) -> Float[torch.Tensor, " rows"]:
        """The readout of each row of block ``stop``'s output (prompt batch ``batch_index``, stacked
        variants variant-major)."""
        raise NotImplementedError

    def reads_weights(self, component: Component | str) -> bool:
        """Whether the readout itself uses some of the component's weights (so a variant must keep
        the patch through the readout); the anchor reads only the residual stream."""
        return False

    def block_inputs(self, top: int | None = None) -> list[dict[int, Float[torch.Tensor, "batch seq hidden"]]]:
        """Per prompt batch, the receiver's input of every block ``1..top`` (default: :attr:`stop`),
        computed once and shared by every engine that re-runs a segment of blocks from a cached
        input (exact weight patching, activation patching, supplier tracing). Engines call it on
        construction, with the receiver's own weights in place (patches restore them bit-exactly,
        so the cache stays valid)."""
        top = self.stop if top is None else top
        if self._block_inputs is None or self._block_inputs_top < top:
            with torch.no_grad():
                self._block_inputs = [
                    run_segment(self.pair.model, self.pair.space, b, stop=top, capture_inputs=range(1, top + 1))[1]
                    for b in self.batches
                ]
            self._block_inputs_top = top
        return self._block_inputs

    def effect(self, f_patched: Float[torch.Tensor, " prompt"]) -> Effect:
        """Normalized effect of a patched model given its values on every prompt; refuses
        (:class:`WeightPatchError`) NaN/inf values rather than writing them into a table."""
        if not torch.isfinite(f_patched[self.valid]).all():
            raise WeightPatchError(
                f"a patched model's {self.objective} scores contain NaN/inf: its weights overflow in this dtype or "
                "are not finite; check the pair with `wpatch check`, or use float32"
            )
        ratios = ((f_patched - self.f_receiver) / self.gap)[self.valid].double()
        n = ratios.numel()
        stderr = float(ratios.std() / math.sqrt(n)) if n > 1 else float("nan")
        return Effect(float(ratios.mean()), stderr, n)


class AnchorScorer(GapScorer):
    """Everything needed to score patched models on one prompt set with one anchor.

    On construction it runs the receiver and the donor once to get ``F_receiver``, ``F_donor`` and
    the gaps. ``batch_size`` bounds the prompts per forward pass. Prompts longer than the model's
    context (:func:`weightpatch.runner.context_length`) are refused, or with ``truncate_prompts``
    cut to their last tokens.
    """

    def __init__(
        self,
        pair: ModelPair,
        anchor: Anchor,
        texts: Sequence[str | PromptRecord],
        batch_size: int = 16,
        min_relative_gap: float = 0.1,
        truncate_prompts: bool = False,
        render: str | None = None,
    ) -> None:
        if not texts:
            raise WeightPatchError("no prompts to score; the prompt set is empty")
        anchor.check_compatible(pair)
        self.pair, self.anchor, self.texts = pair, anchor, model_texts(pair.tokenizer, texts, render)
        self.u = anchor.vector.to(device=pair.device, dtype=self.value_dtype)
        limit = context_length(pair.model, pair.tokenizer)
        encoded = encode(pair.tokenizer, self.texts, pair.device, max_length=limit, truncate=truncate_prompts)
        self.batches: list[Batch] = list(batches(encoded, batch_size))
        with torch.no_grad():
            self.measure_references(min_relative_gap)

    @property
    def layer(self) -> int:
        return self.anchor.layer

    def _facts(self) -> dict[str, object]:
        gap = self.gap[self.valid]
        return {
            "prompts": len(self.texts),
            "excluded (tiny gap)": self.n_excluded,
            "anchor layer": self.layer,
            "mean anchor gap": float(gap.mean()),
            "receiver": self.pair.receiver,
        }

    def __repr__(self) -> str:
        from weightpatch.display import facts_text

        return f"AnchorScorer({facts_text(self._facts())})"

    def _repr_html_(self) -> str:
        from weightpatch.display import html_card

        return html_card("AnchorScorer", self._facts())

    # ---- the anchor objective of the sweep engine (weightpatch.engine.objective.Objective) --------
    last_position = True  # the anchor reads the last prompt token only

    @property
    def stop(self) -> int:
        """The last block a variant runs: the anchor layer."""
        return self.anchor.layer

    def readout(self, hidden: Float[torch.Tensor, "rows seq hidden"], batch_index: int) -> Float[torch.Tensor, " rows"]:
        """The anchor score of each row (any prompt batch: the anchor reads only the hidden state)."""
        return self.project(hidden)

    def project(self, hidden: Float[torch.Tensor, "batch seq hidden"]) -> Float[torch.Tensor, " batch"]:
        """Anchor score of each row: the last token's residual projected on ``u``."""
        return hidden[:, -1].to(self.u.dtype) @ self.u

    def forward_values(self, model: torch.nn.Module, batch: Batch) -> Float[torch.Tensor, " batch"]:
        """F(model, x) of one batch: the anchor layer's last-position residual projected on ``u``."""
        return self.project(run_segment(model, self.pair.space, batch, stop=self.layer, last_position=True)[0])

    def anchor_scores(self, model: torch.nn.Module) -> Float[torch.Tensor, " prompt"]:
        """F(model, x) for every prompt, with the model's current weights."""
        return self.values(model)
