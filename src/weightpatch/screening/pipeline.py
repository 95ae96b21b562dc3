"""Screen-then-verify (SPEC section 6): rank every component with the first-order score, verify the
top candidates by actual replacement, and report both columns side by side."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from weightpatch.components import KINDS, Kind
from weightpatch.results import ScoreTable
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen
from weightpatch.screening.first_order import gradient_scores


def screen_then_verify(
    scorer: AnchorScorer,
    kinds: Iterable[Kind] = KINDS,
    top_k: int = 20,
    by_abs: bool = True,
    variants_per_batch: int = 8,
    progress: bool = True,
) -> tuple[ScoreTable, pd.DataFrame]:
    """First-order scores for every component of ``kinds``; exact scores for the ``top_k`` of each
    kind (by ``|score|`` with ``by_abs``). Returns the long table (both methods) and a wide table of
    the verified components with ``first_order`` and ``exact`` columns, sorted by exact score."""
    kinds = tuple(kinds)
    screened = gradient_scores(scorer, kinds=kinds, progress=progress)
    candidates = [c for kind in kinds for c in screened.top(top_k, kind=kind, by_abs=by_abs).components()]
    verified = ExactScreen(scorer, variants_per_batch).run(candidates, progress=progress)
    table = ScoreTable.concat([screened, verified])
    wide = table.side_by_side()
    wide = wide[wide["component"].isin(candidates)].sort_values("exact", ascending=False, key=abs)
    return table, wide.reset_index(drop=True)
