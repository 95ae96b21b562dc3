"""Screen-then-verify (docs/method.md, "Screen then verify"): rank every component with a cheap
screen (first-order by default), verify the top candidates of each kind by actual replacement, and
report both columns side by side. The one implementation, used by the pipeline's screen stage (which
persists and resumes it in a run directory) and by merge evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import pandas as pd

from weightpatch.backends import Backend, LocalBackend
from weightpatch.components import KINDS, Kind
from weightpatch.results import ScoreTable
from weightpatch.scoring import GapScorer
from weightpatch.screening.first_order import gradient_scores


def verification_candidates(
    screened: ScoreTable, kinds: Iterable[Kind], top_k: int, by_abs: bool = True, extra: Sequence[str] = ()
) -> list[str]:
    """The ``top_k`` components of each kind by screen score (``|score|`` with ``by_abs``), then the
    ``extra`` names not already among them, in that order."""
    candidates = [c for kind in kinds for c in screened.top(top_k, kind=kind, by_abs=by_abs).components()]
    return candidates + [c for c in extra if c not in candidates]


def verified_table(table: ScoreTable, candidates: Sequence[str]) -> pd.DataFrame:
    """Wide table of ``candidates`` (one column per method: ``first_order``, ``exact``, ...), sorted
    by ``|exact|`` when there are exact scores."""
    if not len(table):
        return pd.DataFrame(columns=["component", "kind", "layer", "index"])
    wide = table.side_by_side()
    wide = wide[wide["component"].isin(set(candidates))]
    if "exact" in wide.columns:
        wide = wide.sort_values("exact", ascending=False, key=abs)
    return wide.reset_index(drop=True)


def screen_then_verify(
    scorer: GapScorer,
    kinds: Iterable[Kind] = KINDS,
    top_k: int = 20,
    *,
    by_abs: bool = True,
    extra: Sequence[str] = (),
    screened: ScoreTable | None = None,
    backend: Backend | None = None,
    skip: Iterable[str] = (),
    on_result: Callable[[ScoreTable], None] | None = None,
    variants_per_batch: int = 8,
    progress: bool = True,
) -> tuple[ScoreTable, pd.DataFrame]:
    """First-order scores for every component of ``kinds`` (or the given ``screened`` table), exact
    scores for the ``top_k`` of each kind plus ``extra``, on ``backend`` (default: this process,
    batched neuron sweeps). ``skip`` names already verified and ``on_result`` receives each finished
    group (resumable runs). Returns the long table (screen rows and the exact rows computed here) and
    the wide table of the candidates."""
    kinds = tuple(kinds)
    if screened is None:
        screened = gradient_scores(scorer, kinds=kinds, progress=progress)
    candidates = verification_candidates(screened, kinds, top_k, by_abs, extra)
    if backend is None:
        backend = LocalBackend.from_scorer(scorer, variants_per_batch)
    with backend as exact:
        verified = exact.run(candidates, skip=set(skip), on_result=on_result, progress=progress)
    table = ScoreTable.concat([screened, verified])
    return table, verified_table(table, candidates)
