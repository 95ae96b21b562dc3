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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import groupby

import torch
from tqdm.auto import tqdm

from weightpatch.components import Component
from weightpatch.patch import patched
from weightpatch.results import ScoreTable, score_row
from weightpatch.runner import run_segment
from weightpatch.scoring import AnchorScorer

METHOD = "exact"


class ExactScreen:
    """Exact scores for a list of components on one scorer's prompts and anchor."""

    def __init__(self, scorer: AnchorScorer, variants_per_batch: int = 8) -> None:
        self.scorer, self.variants_per_batch = scorer, variants_per_batch
        pair = scorer.pair
        self.model, self.space = pair.model, pair.space
        self.inputs = scorer.block_inputs()

    def _anchor_scores(self, group: Sequence[Component], start: int) -> torch.Tensor:
        """Anchor scores (variant, prompt) of each component of ``group`` patched alone, all
        starting at block ``start``."""
        pair, scorer, anchor = self.scorer.pair, self.scorer, self.scorer.layer
        # block `start` (or the whole segment when it begins at the embedding) per variant
        stop_first = start if start > 0 else anchor
        outs: list[list[torch.Tensor]] = []
        for component in group:
            with patched(self.model, pair.donor, self.space, [component]):
                outs.append(
                    [
                        run_segment(
                            self.model,
                            self.space,
                            b,
                            stop=stop_first,
                            start=start,
                            hidden_in=self.inputs[i].get(start) if start > 0 else None,
                            last_position=stop_first == anchor,
                        )[0]
                        for i, b in enumerate(scorer.batches)
                    ]
                )
        rows = []
        for i, b in enumerate(scorer.batches):
            stacked = torch.cat([o[i] for o in outs])
            if stop_first < anchor:
                stacked = run_segment(
                    self.model,
                    self.space,
                    b.repeat(len(group)),
                    stop=anchor,
                    start=start + 1,
                    hidden_in=stacked,
                    last_position=True,
                )[0]
            rows.append(scorer.project(stacked).view(len(group), len(b)))
        return torch.cat(rows, dim=1)

    def run(
        self,
        components: Iterable[Component | str],
        skip: set[str] | None = None,
        on_result: Callable[[ScoreTable], None] | None = None,
        progress: bool = True,
    ) -> ScoreTable:
        """Score each component. ``skip``: names already scored (resumed runs); ``on_result`` gets
        each finished group's rows, so callers can persist them as they come."""
        skip = skip or set()
        todo = [self.space.validate(c) for c in components]
        todo = [c for c in todo if c.name not in skip]
        start = {c: self.space.first_affected_layer(c) for c in todo}
        rows: list[dict] = []
        bar = tqdm(total=len(todo), desc="exact", unit="comp", disable=not progress)
        with torch.no_grad():
            todo.sort(key=start.__getitem__)
            for first, same_start in groupby(todo, key=start.__getitem__):
                same_start = list(same_start)
                for i in range(0, len(same_start), self.variants_per_batch):
                    group = same_start[i : i + self.variants_per_batch]
                    if first > self.scorer.layer:
                        group_rows = [score_row(c, METHOD, 0.0, 0.0, int(self.scorer.valid.sum())) for c in group]
                    else:
                        f = self._anchor_scores(group, first)
                        group_rows = []
                        for c, f_c in zip(group, f, strict=True):
                            e = self.scorer.effect(f_c)
                            group_rows.append(score_row(c, METHOD, e.mean, e.stderr, e.n_prompts))
                    rows += group_rows
                    if on_result:
                        on_result(ScoreTable.from_rows(group_rows))
                    bar.update(len(group))
        bar.close()
        return ScoreTable.from_rows(rows)


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
