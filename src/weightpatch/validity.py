"""The anchor validity check (docs/method.md, "Behaviour objective and anchor validity"): does
recovering the anchor recover the behaviour?

Patch the top-``k`` components of one kind (ranked by a score table, normally the anchor's) into
the base and measure, on the same prompts, both the anchor recovery ``E`` (fraction of the anchor
gap) and the behaviour recovery ``E_B`` (fraction of the teacher-forced behaviour gap,
:mod:`weightpatch.behaviour`), optionally with a checker metric (e.g. IFEval strict accuracy of
greedy generations), against random ``k``-subsets drawn from every component of that kind.

The verdict compares the top-``k`` row's two recoveries (the behaviour one is the checker's,
normalized between base and specialized, where the prompts carry IFEval instructions): the anchor
misleads here when it is at least :data:`ANCHOR_RECOVERED` while the behaviour stays below
:data:`BEHAVIOUR_MISSED`, and it under-reports when the reverse holds.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from scipy import stats

from weightpatch.components import ComponentSpace, Kind
from weightpatch.errors import WeightPatchError
from weightpatch.results import ScoreTable
from weightpatch.scoring import GapScorer
from weightpatch.validation import gap_fraction, with_patch

ANCHOR_RECOVERED = 0.8  # "the anchor came back"
BEHAVIOUR_MISSED = 0.3  # "the behaviour did not"
DEFAULT_K = 16
DEFAULT_CONTROLS = 5
KIND_PREFERENCE: tuple[Kind, ...] = ("module", "head", "layer", "neuron")
DISJOINT_MODULE_CLASSES = ("attention", "mlp")

Metric = Callable[[torch.nn.Module], float]


def recoveries(anchor_scorer: GapScorer, behaviour_scorer: GapScorer, model: torch.nn.Module) -> dict[str, float]:
    """``{"anchor", "behaviour"}``: the fractions of each gap ``model`` recovers from the base."""
    return {
        "anchor": gap_fraction(anchor_scorer, anchor_scorer.values(model), "specialized"),
        "behaviour": gap_fraction(behaviour_scorer, behaviour_scorer.values(model), "specialized"),
    }


def disjoint_pool(space: ComponentSpace, kind: Kind) -> list[str]:
    """Every component of ``kind`` with no overlap between any two: for modules the attention and
    MLP blocks (their projections and norms nest inside or sit beside them), for other kinds all."""
    return [
        c.name
        for c in space.components(kinds=(kind,))
        if kind != "module" or c.component_class in DISJOINT_MODULE_CLASSES
    ]


def default_kind(table: ScoreTable) -> Kind:
    """The first kind of :data:`KIND_PREFERENCE` that ``table`` has rows of."""
    kind = next((k for k in KIND_PREFERENCE if (table.frame["kind"] == k).any()), None)
    if kind is None:
        raise WeightPatchError("the score table is empty: screen some components before the validity check")
    return kind


def validity_ranking(
    table: ScoreTable, pool: Sequence[str], kind: Kind, method: str | None = None
) -> tuple[str, list[str]]:
    """(method, the components of ``pool`` ranked by signed ``kind`` score, largest first):
    ``method`` defaults to ``exact`` where the kind has exact rows, else the first other method by
    name."""
    frame = table.frame
    rows = frame[(frame["kind"] == kind) & frame["component"].isin(set(pool))]
    if method is None:
        methods = set(rows["method"])
        method = "exact" if "exact" in methods else (sorted(methods)[0] if methods else "")
    ranked = rows[rows["method"] == method].sort_values("score", ascending=False, kind="stable")
    if ranked.empty:
        raise WeightPatchError(f"no {method or 'scored'} rows of kind {kind} to rank for the validity check")
    return method, list(dict.fromkeys(ranked["component"]))


def anchor_validity(
    anchor_scorer: GapScorer,
    behaviour_scorer: GapScorer,
    table: ScoreTable,
    k: int = DEFAULT_K,
    kind: Kind | None = None,
    method: str | None = None,
    controls: int = DEFAULT_CONTROLS,
    seed: int = 0,
    metric: Metric | None = None,
) -> pd.DataFrame:
    """One row per patched set: ``selection`` (``top`` or ``random``), ``draw``, ``k``, ``kind``,
        ``method`` (the ranking's), ``anchor`` and ``behaviour`` (fractions of each gap recovered) and,
        with ``metric``, ``metric`` (its raw value) plus two reference rows (``base``, ``specialized``)
        so the metric can be normalized. The random controls draw from every component of ``kind``
        (``controls`` draws; the draws are seeded); for modules, the ranking and the draws keep only the
    attention and MLP blocks (:func:`disjoint_pool`), so no two patched components nest. ``k`` larger
    than the ranking is cut to it."""
    pair = anchor_scorer.pair
    if pair.receiver != "base":
        raise WeightPatchError("the validity check patches the base: open the pair with receiver='base'")
    kind = kind or default_kind(table)
    pool = disjoint_pool(pair.space, kind)
    method, ranked = validity_ranking(table, pool, kind, method)
    k = min(k, len(ranked))
    if k < 1:
        raise WeightPatchError("k must be at least 1 for the validity check")
    rng = random.Random(seed)
    draws: list[tuple[str, int, list[str]]] = [("top", 0, ranked[:k])]
    draws += [("random", i, rng.sample(pool, k)) for i in range(controls if k < len(pool) else 0)]
    rows = []
    for selection, draw, components in draws:
        with torch.no_grad(), with_patch(pair, components) as model:
            row = {
                "selection": selection,
                "draw": draw,
                "k": k,
                "kind": kind,
                "method": method,
                **recoveries(anchor_scorer, behaviour_scorer, model),
            }
            if metric is not None:
                row["metric"] = float(metric(model))
        row["components"] = list(components)
        rows.append(row)
    if metric is not None:
        rows.append(
            {
                "selection": "base",
                "draw": 0,
                "k": 0,
                "kind": kind,
                "method": method,
                "anchor": 0.0,
                "behaviour": 0.0,
                "metric": float(metric(pair.model)),
                "components": [],
            }
        )
        with pair.as_model("specialized") as sft:
            rows.append(
                {
                    "selection": "specialized",
                    "draw": 0,
                    "k": 0,
                    "kind": kind,
                    "method": method,
                    "anchor": 1.0,
                    "behaviour": 1.0,
                    "metric": float(metric(sft)),
                    "components": [],
                }
            )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Verdict:
    """The check's outcome: ``status`` and the one line the report and CLI summary print."""

    status: Literal["valid", "misleads", "under-reports", "partial"]
    line: str

    @property
    def warns(self) -> bool:
        return self.status in ("misleads", "under-reports")


def validity_verdict(frame: pd.DataFrame, ranked_by: str = "anchor") -> Verdict:
    """The verdict of an :func:`anchor_validity` table (see the module docstring for the rule);
    ``ranked_by`` names the objective whose scores ranked the components. The behaviour side of the
    rule is the checker's recovery ``(top - base) / (specialized - base)`` where the table has a
    checker whose base and specialized values differ (the prompts carry IFEval instructions), else
    the teacher-forced behaviour recovery."""
    top = frame[frame["selection"] == "top"].iloc[0]
    randoms = frame[frame["selection"] == "random"]
    a, b, k, kind = float(top["anchor"]), float(top["behaviour"]), int(top["k"]), top["kind"]
    facts = (
        f"top-{k} {kind}s by {top['method']} {ranked_by} score recover {a:.2f} of the anchor gap "
        f"and {b:.2f} of the behaviour gap"
    )
    if len(randoms):
        facts += f" (random {k}: {randoms['anchor'].mean():.2f} and {randoms['behaviour'].mean():.2f})"
    if "metric" in frame and frame["metric"].notna().any():
        ref = frame.set_index("selection")["metric"]
        if {"base", "specialized"} <= set(ref.index):
            facts += f"; checker {ref['top']:.2f} (base {ref['base']:.2f}, specialized {ref['specialized']:.2f})"
            if abs(ref["specialized"] - ref["base"]) > 1e-9:
                b = float((ref["top"] - ref["base"]) / (ref["specialized"] - ref["base"]))
                facts += f", {b:.2f} of its gap"
    if a >= ANCHOR_RECOVERED and b < BEHAVIOUR_MISSED:
        return Verdict(
            "misleads",
            f"anchor misleads here: {facts}; rank with --objective behaviour or rebuild the anchor at another layer",
        )
    if b >= ANCHOR_RECOVERED and a < BEHAVIOUR_MISSED:
        return Verdict("under-reports", f"anchor under-reports here: {facts}; rank with --objective behaviour")
    if a >= ANCHOR_RECOVERED and b >= 0.5:
        return Verdict("valid", f"anchor valid here: {facts}")
    return Verdict("partial", f"anchor and behaviour partly recovered: {facts}")


def objective_agreement(anchor: ScoreTable, behaviour: ScoreTable, k: int = 10) -> pd.DataFrame:
    """Where the two objectives rank alike: Spearman rank correlation and top-``k`` overlap (by
    ``|score|``) of the anchor and behaviour scores of the components both tables hold, per kind
    (``layer`` NaN) and per kind and layer (layers with at least 3 shared components; Spearman is NaN
    where either objective scores every component alike, e.g. all 0 above the anchor). Each table
    should hold one method per component (e.g. both first order)."""
    merged = anchor.frame.merge(behaviour.frame, on=["component", "kind", "layer"], suffixes=("_anchor", "_behaviour"))
    rows = []

    def add(kind: str, layer: float, sub: pd.DataFrame) -> None:
        if len(sub) < 3:
            return
        top = min(k, len(sub))
        by_anchor = set(sub.loc[sub["score_anchor"].abs().nlargest(top).index, "component"])
        by_behaviour = set(sub.loc[sub["score_behaviour"].abs().nlargest(top).index, "component"])
        constant = sub["score_anchor"].nunique() < 2 or sub["score_behaviour"].nunique() < 2
        rho = float("nan") if constant else stats.spearmanr(sub["score_anchor"], sub["score_behaviour"]).statistic
        rows.append(
            {"kind": kind, "layer": layer, "n": len(sub), "spearman": float(rho), "k": top,
             "overlap": len(by_anchor & by_behaviour)}
        )  # fmt: skip

    for kind, sub in merged.groupby("kind", sort=False):
        add(str(kind), float("nan"), sub)
        for layer, inner in sub.dropna(subset=["layer"]).groupby("layer"):
            add(str(kind), float(layer), inner)
    return pd.DataFrame(rows, columns=["kind", "layer", "n", "spearman", "k", "overlap"])


def currency_curves(
    anchor_scorer: GapScorer,
    behaviour_scorer: GapScorer,
    rankings: dict[str, ScoreTable],
    ks: Sequence[int],
    kind: Kind = "module",
) -> pd.DataFrame:
    """Sufficiency curves in both currencies: for each named ranking (e.g. ``{"anchor": ...,
    "behaviour": ...}``) and each ``k``, the top-``k`` components of ``kind`` (disjoint pool, see
    :func:`disjoint_pool`) patched into the base, with the fraction of the anchor gap and of the
    behaviour gap recovered. Columns: ``ranking, k, anchor, behaviour, components``."""
    pair = anchor_scorer.pair
    pool = disjoint_pool(pair.space, kind)
    rows = []
    for name, table in rankings.items():
        _, ranked = validity_ranking(table, pool, kind)
        for k in sorted({min(int(k), len(ranked)) for k in ks if k > 0}):
            with torch.no_grad(), with_patch(pair, ranked[:k]) as model:
                rows.append(
                    {
                        "ranking": name,
                        "k": k,
                        **recoveries(anchor_scorer, behaviour_scorer, model),
                        "components": ranked[:k],
                    }
                )
    return pd.DataFrame(rows)
