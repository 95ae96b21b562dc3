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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float

from weightpatch.anchors import Anchor
from weightpatch.errors import WeightPatchError
from weightpatch.pair import ModelPair, Role
from weightpatch.runner import Batch, batches, context_length, encode, run_segment


@dataclass(frozen=True)
class Effect:
    """A normalized effect: mean over valid prompts, its standard error, and the prompt count."""

    mean: float
    stderr: float
    n_prompts: int


class AnchorScorer:
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
        texts: Sequence[str],
        batch_size: int = 16,
        min_relative_gap: float = 0.1,
        truncate_prompts: bool = False,
    ) -> None:
        if not texts:
            raise WeightPatchError("no prompts to score; the prompt set is empty")
        anchor.check_compatible(pair)
        self.pair, self.anchor, self.texts = pair, anchor, list(texts)
        # scores accumulate in float32 (float64 for float64 models, e.g. finite-difference checks)
        dtype = torch.float64 if pair.model.dtype == torch.float64 else torch.float32
        self.u = anchor.vector.to(device=pair.device, dtype=dtype)
        limit = context_length(pair.model, pair.tokenizer)
        encoded = encode(pair.tokenizer, self.texts, pair.device, max_length=limit, truncate=truncate_prompts)
        self.batches: list[Batch] = list(batches(encoded, batch_size))
        self._block_inputs: list[dict[int, torch.Tensor]] | None = None
        self._block_inputs_top = -1
        with torch.no_grad():
            self.f_receiver = self.anchor_scores(pair.model)
            donor_role: Role = "specialized" if pair.receiver == "base" else "base"
            with pair.as_model(donor_role) as donor_model:
                self.f_donor = self.anchor_scores(donor_model)
        self.gap = self.f_donor - self.f_receiver
        if not torch.isfinite(self.gap).all():
            raise WeightPatchError("anchor scores contain NaN/inf: check the model weights and dtype (try float32)")
        threshold = min_relative_gap * self.gap.abs().median()
        self.valid = self.gap.abs() > threshold
        self.n_excluded = int((~self.valid).sum())
        if not self.valid.any():
            raise WeightPatchError(
                "the anchor does not separate the two models on these prompts (every gap is ~0); "
                "use prompts that exercise the capability or rebuild the anchor"
            )

    @property
    def layer(self) -> int:
        return self.anchor.layer

    # ---- the anchor objective of the sweep engine (weightpatch.engine.objective.Objective) --------
    last_position = True  # the anchor reads the last prompt token only

    @property
    def stop(self) -> int:
        """The last block a variant runs: the anchor layer."""
        return self.anchor.layer

    @property
    def reference(self) -> Float[torch.Tensor, " prompt"]:
        """The receiver's anchor score on every prompt (``F_receiver``)."""
        return self.f_receiver

    def readout(self, hidden: Float[torch.Tensor, "rows seq hidden"], batch_index: int) -> Float[torch.Tensor, " rows"]:
        """The anchor score of each row (any prompt batch: the anchor reads only the hidden state)."""
        return self.project(hidden)

    def block_inputs(self, top: int | None = None) -> list[dict[int, Float[torch.Tensor, "batch seq hidden"]]]:
        """Per prompt batch, the receiver's input of every block ``1..top`` (default: the anchor
        layer), computed once and shared by every engine that re-runs a segment of blocks from a
        cached input (exact weight patching, activation patching, supplier tracing). Engines call it
        on construction, with the receiver's own weights in place (patches restore them bit-exactly,
        so the cache stays valid)."""
        top = self.layer if top is None else top
        if self._block_inputs is None or self._block_inputs_top < top:
            with torch.no_grad():
                self._block_inputs = [
                    run_segment(self.pair.model, self.pair.space, b, stop=top, capture_inputs=range(1, top + 1))[1]
                    for b in self.batches
                ]
            self._block_inputs_top = top
        return self._block_inputs

    def project(self, hidden: Float[torch.Tensor, "batch seq hidden"]) -> Float[torch.Tensor, " batch"]:
        """Anchor score of each row: the last token's residual projected on ``u``."""
        return hidden[:, -1].to(self.u.dtype) @ self.u

    def anchor_scores(self, model: torch.nn.Module) -> Float[torch.Tensor, " prompt"]:
        """F(model, x) for every prompt, with the model's current weights."""
        out = [
            self.project(run_segment(model, self.pair.space, b, stop=self.layer, last_position=True)[0])
            for b in self.batches
        ]
        return torch.cat(out)

    def effect(self, f_patched: Float[torch.Tensor, " prompt"]) -> Effect:
        """Normalized effect of a patched model given its anchor scores on every prompt; refuses
        (:class:`WeightPatchError`) NaN/inf scores rather than writing them into a table."""
        if not torch.isfinite(f_patched[self.valid]).all():
            raise WeightPatchError(
                "a patched model's anchor scores contain NaN/inf: its weights overflow in this dtype or are not "
                "finite; check the pair with `wpatch check`, or use float32"
            )
        ratios = ((f_patched - self.f_receiver) / self.gap)[self.valid].double()
        n = ratios.numel()
        stderr = float(ratios.std() / math.sqrt(n)) if n > 1 else float("nan")
        return Effect(float(ratios.mean()), stderr, n)
