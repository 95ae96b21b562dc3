"""Exact Weight Patching scores: each component patched alone, scored exactly (docs/method.md,
"Exact, first-order and integrated-gradient scores").

The plain way costs a full forward per component per prompt batch. Here:

- the base inputs of every block up to the anchor layer are cached once per prompt batch (by the
  scorer, :meth:`~weightpatch.scoring.AnchorScorer.block_inputs`, shared with the other engines), so a
  component in layer ``l`` re-runs only blocks ``l..anchor`` (nothing above the anchor, no
  unembedding);
- several components of the same layer are patched one at a time for block ``l`` only, then their
  outputs are stacked into one batch that runs blocks ``l+1..anchor`` together;
- the anchor block computes only what the anchor reads, the last position: its MLP and attention
  output projection run on that position alone (``run_segment(last_position=True)``; the receiver's
  and donor's anchor scores are computed the same way, so a patch that changes nothing scores 0).

Components that cannot reach the anchor (blocks above it, the final norm, the unembedding) have
exactly zero effect and are scored 0 without running anything.

The same strategy serves the behaviour objective (:class:`~weightpatch.behaviour.BehaviourScorer`):
its stop is the last block, every position is read, and the components its readout uses (final
norm, unembedding, a tied embedding) run the plain way (:class:`~weightpatch.engine.sweep.WholeModel`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from weightpatch.components import Component
from weightpatch.engine import EffectStrategy, readout_variants, run_blocks
from weightpatch.patch import patched
from weightpatch.results import ScoreTable, score_row
from weightpatch.scoring import AnchorScorer, GapScorer

METHOD = "exact"


class ExactScreen(EffectStrategy[Component]):
    """Exact scores for a list of components on one scorer's prompts (either objective): the
    weight-slice strategy of the sweep (:meth:`run`: ``skip`` names already scored, ``on_result`` gets each
    finished group's rows)."""

    method = METHOD

    def __init__(self, scorer: GapScorer, variants_per_batch: int = 8) -> None:
        super().__init__(scorer)
        self.scorer, self.variants_per_batch = scorer, variants_per_batch
        scorer.block_inputs()  # cached now, with the receiver's own weights in place

    def values(self, group: Sequence[Component], layer: int) -> torch.Tensor:
        """Objective values (variant, prompt) of each component of ``group`` patched alone, all
        first affecting block ``layer``: block ``layer`` per variant (the whole segment when it
        begins at the embedding), then the variants stacked up to the objective's stop (the
        anchor layer, or the last block under the behaviour objective)."""
        scorer, stop = self.scorer, self.scorer.stop
        stop_first = layer if layer > 0 else stop
        outs: list[list[torch.Tensor]] = []
        for component in group:
            with patched(self.model, scorer.pair.donor, self.space, [component]):
                outs.append([run_blocks(scorer, i, layer, stop_first) for i in range(len(scorer.batches))])
        stacked = [torch.cat([o[i] for o in outs]) for i in range(len(scorer.batches))]
        if stop_first < stop:
            stacked = [run_blocks(scorer, i, layer + 1, hidden=h, variants=len(group)) for i, h in enumerate(stacked)]
        return readout_variants(scorer, stacked, len(group))

    run = EffectStrategy.score


def plain_exact_scores(
    scorer: AnchorScorer, components: Iterable[Component | str], progress: bool = False
) -> ScoreTable:
    """The plain way, for reference and benchmarks: swap the weights, run the whole model
    (through the unembedding), read the anchor layer, restore."""
    pair = scorer.pair
    captured: list[torch.Tensor] = []
    block = pair.model.get_submodule(pair.space.layer_path(scorer.layer))
    handle = block.register_forward_hook(lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
    rows = []
    try:
        with torch.no_grad():
            for c in tqdm(list(components), desc="plain", disable=not progress):
                c = pair.space.validate(c)
                scores = []
                with patched(pair.model, pair.donor, pair.space, [c]):
                    for b in scorer.batches:
                        captured.clear()
                        pair.model(**b.kwargs(), use_cache=False)
                        scores.append(scorer.project(captured[0]))
                e = scorer.effect(torch.cat(scores))
                rows.append(score_row(c, METHOD, e.mean, e.stderr, e.n_prompts))
    finally:
        handle.remove()
    return ScoreTable.from_rows(rows)
