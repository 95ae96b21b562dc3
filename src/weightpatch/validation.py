"""Validation of a ranking (docs/method.md, "Validation"): sufficiency, necessity, behaviour, interactions.

All anchor numbers are fractions of the same gap as ``E_w`` (:class:`AnchorScorer`), on the
scorer's prompts. A ranking is a :class:`ScoreTable` (any method: exact, first order, activation)
of one ``method`` (a table with several needs ``method=``) and, as the pipeline ranks, one ``kind``
(several are ranked together with a warning), components nested in a ranked one left out (with a
warning); its top-``k`` is compared with random
``k``-subsets of the whole kind (:func:`control_pool`: the ranked components and every other one of
the model with the same kind and component class), :data:`DEFAULT_CONTROLS` draws by default (fewer than
:data:`MIN_CONTROLS` are raised to it, with a warning; 0 means none), mean and standard deviation. No control is drawn
where ``k`` equals the pool (every subset is the top-``k`` itself): ``random_mean`` is NaN there.

- **Sufficiency**: the top-``k`` weights patched into the base; ``recovery`` = mean fraction of the
  gap recovered (1 = the specialized model's anchor score).
- **Necessity**: the top-``k`` knocked out of the specialized model (base weights put back);
  ``drop`` = mean fraction of the gap removed (1 = back to the base's score). With a
  base-receiver pair the knockout model is built exactly, as "every parameter patched from the
  specialized model, then the top-``k`` slices restored to the base's values" (this *is*
  ``M_sft^(C <- base)``, bit for bit); with a specialized-receiver pair (``load_pair(...,
  receiver="specialized")``) the top-``k`` is patched from the base donor directly.
- **Behaviour** (optional, per ``k`` for the top-``k`` only): ``kl`` = mean KL(P_sft || P_model) of
  the next-token distributions at the last prompt token (``kl_positions="last"``) or averaged over
  every real token (``"all"``), and ``behavior`` = a user metric ``behavior_metric(model) ->
  float`` called with the patched model (e.g. checker accuracy of greedy generations via
  :mod:`weightpatch.generation` and :mod:`weightpatch.checkers`). Recovering the anchor does not by
  itself recover the behaviour; report both.
- **Interactions**: for the top-``m`` components, ``E(a ∪ b) - E(a) - E(b)`` (0 = additive).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Literal

import numpy as np
import pandas as pd
import torch

from weightpatch.components import Component, ComponentSpace, ParamSlice
from weightpatch.engine import sweep
from weightpatch.pair import ModelPair
from weightpatch.patch import Patch, patched
from weightpatch.results import Curve, ScoreTable
from weightpatch.runner import Batch
from weightpatch.scoring import GapScorer

logger = logging.getLogger("weightpatch")
BehaviorMetric = Callable[[torch.nn.Module], float]
DEFAULT_CONTROLS = 8  # random k-subsets per k
MIN_CONTROLS = 5  # fewer draws give no usable spread


class _Originals:
    """A weight source reading the receiver's original values saved by a full :func:`patched`."""

    def __init__(self, patch: Patch) -> None:
        self.patch = patch

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.patch.original(name).shape)

    def read(self, piece: ParamSlice) -> torch.Tensor:
        full = self.patch.original(piece.name)
        if piece.is_full:
            return full
        return piece.region(full).index_select(piece.dim, piece.index().to(full.device))  # type: ignore[arg-type]


Apply = Callable[[Sequence[Component | str]], AbstractContextManager]


@contextmanager
def _session(pair: ModelPair, mode: Literal["sufficiency", "necessity"]) -> Iterator[Apply]:
    """Per-model contexts for many models of one direction: ``apply(components)`` gives the patched
    base (sufficiency) or the knocked-out specialized model (necessity). Where the direction needs the
    complement, every parameter is patched from the donor once for the whole session and each
    ``apply`` only restores its components' slices (the same weights, bit for bit, as
    patching everything and restoring the components per model, without copying the whole model each
    time)."""
    if (mode == "sufficiency") == (pair.receiver == "base"):
        yield lambda components: patched(pair.model, pair.donor, pair.space, components)
        return
    with patched(pair.model, pair.donor, pair.space, pair.space.everything()) as full:
        yield lambda components: patched(pair.model, _Originals(full), pair.space, components)


@contextmanager
def with_patch(pair: ModelPair, components: Sequence[Component | str]) -> Iterator[torch.nn.Module]:
    """The base with ``components`` patched from the specialized model (sufficiency direction)."""
    with _session(pair, "sufficiency") as apply, apply(components):
        yield pair.model


@contextmanager
def with_knockout(pair: ModelPair, components: Sequence[Component | str]) -> Iterator[torch.nn.Module]:
    """The specialized model with ``components`` knocked out (base weights in), exactly."""
    with _session(pair, "necessity") as apply, apply(components):
        yield pair.model


def gap_fraction(scorer: GapScorer, f: torch.Tensor, toward: Literal["specialized", "base"]) -> float:
    """Mean fraction of the base->specialized gap covered by ``f`` measured from the base
    (``toward="specialized"``: recovery) or from the specialized model (``"base"``: drop)."""
    effect = scorer.effect(f).mean  # from the receiver toward the donor
    from_base = effect if scorer.pair.receiver == "base" else 1.0 - effect
    return from_base if toward == "specialized" else 1.0 - from_base


def next_token_logprobs(model: torch.nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """Log-probabilities (batch, seq, vocab) of the next token for each batch."""
    with torch.no_grad():
        return [torch.log_softmax(model(**b.kwargs(), use_cache=False).logits.float(), -1) for b in batches]


def specialized_logprobs(scorer: GapScorer) -> list[torch.Tensor]:
    """The specialized model's :func:`next_token_logprobs` on ``scorer.batches``: the reference
    of every output KL here."""
    with scorer.pair.as_model("specialized", streamed=True) as sft:
        return next_token_logprobs(sft, scorer.batches)


def output_kl(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    reference: Sequence[torch.Tensor],
    positions: Literal["last", "all"] = "last",
) -> float:
    """Mean KL(P_ref || P_model) of next-token distributions (nats) at the last token or over
    every real token."""
    total, count = 0.0, 0
    for b, ref, got in zip(batches, reference, next_token_logprobs(model, batches), strict=True):
        kl = (ref.exp() * (ref - got)).sum(-1)  # (batch, seq)
        if positions == "last":
            total += float(kl[:, -1].sum())
            count += kl.shape[0]
        else:
            mask = b.attention_mask.bool()
            total += float(kl[mask].sum())
            count += int(mask.sum())
    return total / max(count, 1)


def _nested(name: str, others: set[str]) -> bool:
    """Whether ``name`` lies inside another of ``others`` (``L0.mlp.down`` inside ``L0.mlp``)."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in others for i in range(1, len(parts)))


def _ranking(table: ScoreTable, method: str | None, kind: str | None) -> list[str]:
    """The components of one method, best first, none nested in another. A table with several
    methods is refused without ``method=`` (their scores are not one ranking); one with several kinds
    is ranked as one, with a warning (the pipeline's curves rank each kind on its own: pass
    ``kind=``); nested components (a projection or a neuron of a ranked MLP) are left out, with a
    warning."""
    f = table.select(method, kind).frame
    methods, kinds = list(dict.fromkeys(f["method"])), list(dict.fromkeys(f["kind"]))
    if method is None and len(methods) > 1:
        raise ValueError(f"the score table holds {len(methods)} methods ({', '.join(methods)}); pass method=")
    if kind is None and len(kinds) > 1:
        logger.warning("the ranking mixes kinds (%s); pass kind= to rank one granularity", ", ".join(kinds))
    ranked = list(dict.fromkeys(f.sort_values("score", ascending=False, kind="stable")["component"]))
    names = set(ranked)
    nested = [c for c in ranked if _nested(c, names)]
    if nested:
        logger.warning(
            "%d of %d ranked components lie inside other ranked ones (e.g. %s) and are left out: a ranking "
            "holds disjoint components",
            len(nested),
            len(ranked),
            nested[0],
        )
    return [c for c in ranked if c not in set(nested)]


def control_pool(space: ComponentSpace, ranked: Sequence[str]) -> list[str]:
    """What random controls are drawn from: the ranked components, then every other component of the
    model of the same kinds and component classes (a ranking of the verified few is compared with
    random picks from the whole kind, not from its own top) that neither lies inside another of the
    pool nor contains a ranked one."""
    parsed = [space.parse(c) for c in ranked]
    kinds, classes = {c.kind for c in parsed}, {c.component_class for c in parsed}
    same = [c.name for c in space.components(kinds=kinds) if c.component_class in classes]
    pool, chosen = set(ranked) | set(same), set(ranked)
    containers = {".".join(c.split(".")[:i]) for c in ranked for i in range(1, c.count(".") + 1)}
    return [*ranked, *(c for c in same if c not in chosen and c not in containers and not _nested(c, pool))]


def _ks(ks: int | Sequence[int], n: int) -> list[int]:
    values = range(1, ks + 1) if isinstance(ks, int) else ks
    return sorted({min(int(k), n) for k in values if k > 0})


Subset = tuple[str, tuple[str, ...]]  # (name: "k4/top", "k4/random0", ...; components)


class _Subsets:
    """The top-``k`` / random-subset strategy of the sweep: each subset patched into one model of a
    :func:`_session` (all at once), its fraction of the gap read from a full anchor-score run."""

    method = "curve"
    variants_per_batch = 1

    def __init__(self, scorer: GapScorer, apply: Apply, toward: Literal["specialized", "base"]) -> None:
        self.scorer, self.apply, self.toward = scorer, apply, toward

    @property
    def stop(self) -> int:
        return self.scorer.stop

    def key(self, item: Subset) -> str:
        return item[0]

    def first_layer(self, item: Subset) -> int:
        return 0  # the session's model may differ from the receiver everywhere: run from the embedding

    def rows(self, group: Sequence[Subset], layer: int) -> list[list[dict]]:
        out = []
        for name, components in group:
            with self.apply(components):
                f = self.scorer.values(self.scorer.pair.model)
            out.append([{"subset": name, "value": gap_fraction(self.scorer, f, self.toward)}])
        return out

    def zero_rows(self, group: Sequence[Subset]) -> list[list[dict]]:
        raise AssertionError("subsets start at the embedding")  # first_layer is 0 <= stop


def _subsets(ranked: list[str], pool: list[str], ks: list[int], controls: int, seed: int) -> list[Subset]:
    """Per ``k``: the top-``k`` of ``ranked``, then ``controls`` random ``k``-subsets of ``pool``
    (:func:`control_pool`; none where ``k`` is the whole pool), drawn in this order from one seeded
    generator."""
    rng = random.Random(seed)
    subsets: list[Subset] = []
    for k in ks:
        subsets.append((f"k{k}/top", tuple(ranked[:k])))
        draws = controls if k < len(pool) else 0  # at k = pool size every subset is the top-k
        subsets += [(f"k{k}/random{d}", tuple(rng.sample(pool, k))) for d in range(draws)]
    return subsets


def _curve(
    scorer: GapScorer,
    table: ScoreTable,
    ks: int | Sequence[int],
    method: str | None,
    kind: str | None,
    controls: int,
    seed: int,
    mode: Literal["sufficiency", "necessity"],
    kl: bool,
    kl_positions: Literal["last", "all"],
    behavior_metric: BehaviorMetric | None,
) -> Curve:
    pair = scorer.pair
    ranked = _ranking(table, method, kind)
    if not ranked:
        raise ValueError("the score table has no rows for this method/kind")
    pool = control_pool(pair.space, ranked)
    if len(pool) > len(ranked) and controls:
        logger.info(
            "random controls drawn from %d components of the model (the ranking has %d)", len(pool), len(ranked)
        )
    toward: Literal["specialized", "base"] = "specialized" if mode == "sufficiency" else "base"
    column = "recovery" if mode == "sufficiency" else "drop"
    reference = specialized_logprobs(scorer) if kl else None
    if 0 < controls < MIN_CONTROLS:
        logger.warning("controls=%d raised to %d: fewer random draws give no usable spread", controls, MIN_CONTROLS)
        controls = MIN_CONTROLS
    values = _ks(ks, len(ranked))
    subsets = _subsets(ranked, pool, values, controls, seed)
    rows = []
    with _session(pair, mode) as apply:
        measured = {r["subset"]: r["value"] for r in sweep(_Subsets(scorer, apply, toward), subsets, progress=False)}
        for k in values:
            top = ranked[:k]
            row: dict = {"k": k, column: measured[f"k{k}/top"]}
            randoms = [v for name, v in measured.items() if name.startswith(f"k{k}/random")]
            row["random_mean"] = float(np.mean(randoms)) if randoms else float("nan")
            row["random_std"] = float(np.std(randoms, ddof=1)) if len(randoms) > 1 else float("nan")
            row["n_controls"] = len(randoms)
            if kl or behavior_metric is not None:
                with apply(top):
                    if reference is not None:
                        with torch.no_grad():
                            row["kl"] = output_kl(pair.model, scorer.batches, reference, kl_positions)
                    if behavior_metric is not None:
                        row["behavior"] = float(behavior_metric(pair.model))
            row["components"] = list(top)
            rows.append(row)
    curve = Curve(rows)
    curve.attrs["control_pool"] = len(pool)
    return curve


def sufficiency_curve(
    scorer: GapScorer,
    table: ScoreTable,
    ks: int | Sequence[int] = 10,
    method: str | None = None,
    kind: str | None = None,
    controls: int = DEFAULT_CONTROLS,
    seed: int = 0,
    kl: bool = False,
    kl_positions: Literal["last", "all"] = "last",
    behavior_metric: BehaviorMetric | None = None,
) -> Curve:
    """Anchor recovery of the base with the top-``k`` patched in, for each ``k`` (``ks``: a
    maximum, meaning 1..K, or explicit values), against ``controls`` random ``k``-subsets (0, or
    at least :data:`MIN_CONTROLS`: fewer are raised to it; none where ``k`` is the whole pool). Columns: ``k, recovery,
    random_mean, random_std, n_controls`` (+ ``kl``, ``behavior`` when asked), ``components`` (the
    top-``k`` names, a list). A :class:`Curve`: ``.plot()`` draws it as the report does."""
    return _curve(scorer, table, ks, method, kind, controls, seed, "sufficiency", kl, kl_positions, behavior_metric)


def necessity_curve(
    scorer: GapScorer,
    table: ScoreTable,
    ks: int | Sequence[int] = 10,
    method: str | None = None,
    kind: str | None = None,
    controls: int = DEFAULT_CONTROLS,
    seed: int = 0,
    kl: bool = False,
    kl_positions: Literal["last", "all"] = "last",
    behavior_metric: BehaviorMetric | None = None,
) -> Curve:
    """Anchor drop of the specialized model with the top-``k`` knocked out, against random
    controls (as in :func:`sufficiency_curve`). Columns: ``k, drop, random_mean, random_std,
    n_controls`` (+ ``kl``, ``behavior``), ``components`` (a list). ``kl`` is still measured to
    the specialized model (it grows as the knockout removes more). A :class:`Curve` (``.plot()``)."""
    return _curve(scorer, table, ks, method, kind, controls, seed, "necessity", kl, kl_positions, behavior_metric)


def behavior_of(
    scorer: GapScorer,
    components: Sequence[Component | str],
    mode: Literal["sufficiency", "necessity"] = "sufficiency",
    kl_positions: Literal["last", "all"] = "last",
    behavior_metric: BehaviorMetric | None = None,
    reference: Sequence[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Anchor fraction, output KL to the specialized model and the optional behaviour metric of
    one patched (``"sufficiency"``) or knocked-out (``"necessity"``) model. ``reference``: the
    specialized model's log-probabilities (:func:`specialized_logprobs`) when already computed
    (several calls on one scorer then run the specialized model once)."""
    pair = scorer.pair
    if reference is None:
        reference = specialized_logprobs(scorer)
    context = with_patch if mode == "sufficiency" else with_knockout
    toward: Literal["specialized", "base"] = "specialized" if mode == "sufficiency" else "base"
    with context(pair, components) as model:
        with torch.no_grad():
            out = {
                "anchor": gap_fraction(scorer, scorer.values(model), toward),
                "kl": output_kl(model, scorer.batches, reference, kl_positions),
            }
        if behavior_metric is not None:
            out["behavior"] = float(behavior_metric(model))
    return out


def interaction_matrix(
    scorer: GapScorer,
    components: Sequence[Component | str] | None = None,
    table: ScoreTable | None = None,
    m: int = 8,
    method: str | None = None,
    kind: str | None = None,
) -> pd.DataFrame:
    """Pairwise non-additivity ``E(a ∪ b) - E(a) - E(b)`` of exact weight-patch effects (fractions
    of the gap) for ``components`` (or the top-``m`` of ``table``). Symmetric, NaN diagonal; the
    single effects are in ``.attrs["single"]``."""
    if components is None:
        if table is None:
            raise ValueError("give components or a score table to take the top-m from")
        components = _ranking(table, method, kind)[:m]
    names = [scorer.pair.space.validate(c).name for c in components]
    pair = scorer.pair

    def effect(group: Sequence[str]) -> float:
        with torch.no_grad(), with_patch(pair, group) as model:
            return gap_fraction(scorer, scorer.values(model), "specialized")

    single = {c: effect([c]) for c in names}
    matrix = pd.DataFrame(np.nan, index=names, columns=names)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            value = effect([a, b]) - single[a] - single[b]
            matrix.loc[a, b] = matrix.loc[b, a] = value
    matrix.attrs["single"] = single
    return matrix
