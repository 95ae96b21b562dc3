"""Mechanism-aware merging: per-component coefficients from Weight Patching scores (docs/method.md,
"Mechanism-aware merging").

Each expert comes with the scores of components for *its own* capability (a mapping
``component name -> score``, or a DataFrame with ``component`` and ``score`` columns). Scores are
**clipped** at 0 and **normalized** per expert by that expert's largest score, so every expert's
best component has normalized score 1 (an expert with no positive score has all zeros).
Components resolve to parameter slices through a :class:`~weightpatch.components.ComponentSpace`;
the merge builds per-parameter coefficient masks from those slices, tensor by tensor, so it
streams with :func:`~weightpatch.merging.stream.merge_checkpoints` like any baseline.

Two variants (the paper leaves the exact rule open; both are offered for comparison):

``owner_takes_top``
    Each expert *owns* its selected components: its ``top_k`` highest raw scores (or its top
    ``fraction`` of scored components) and/or those with raw score ``>= threshold`` (both given:
    the top ones among those above the threshold), at
    slice level (a head owns its query rows and output columns, a neuron its row of the up/gate
    projections and its column of the down projection). With ``O(x)`` the experts owning entry
    ``x``, ``s_i(x)`` the normalized score of expert ``i``'s best component covering ``x``,
    ``delta_i = expert_i - base`` and ``lam``, ``w_i`` the standard merge's scale and weights::

        conflict="max":   W(x) = {argmax_i s_i(x)} (equal: the lower index), a_i = 1
        conflict="blend": W(x) = O(x), a_i = s_i(x) / sum_{j in O(x)} s_j(x)   (all 0: 1 / |O(x)|)
        conflict="mean":  W(x) = O(x), a_i = 1 / |O(x)|
        conflict="drop":  entries with |O(x)| > 1 count as unowned
        owned x:    merged = base + strength * sum_{i in W(x)} a_i delta_i
                                  + others * lam * sum_{j not in W(x)} w_j delta_j
        unowned x:  merged = base + rest * (standard(x) - base)

    The defaults (``max``, ``others=0``, ``rest=1``) are the plain rule: the winning owner's delta
    alone on owned entries, the standard merge (task arithmetic, TIES, DARE, ...) everywhere else.
    ``others`` says how much of the other experts' deltas survive on an owner's entries, ``rest``
    how much of the standard merge survives outside every owned entry.

``protect_then_add``
    ``owner_takes_top`` in which only the *protected* expert ``p`` (``protect``, default 0: the
    instruction-following expert) owns components: on the entries of its selected components
    ``merged = base + strength * delta_p + others * lam * sum_{j != p} w_j delta_j``, the standard
    merge (task arithmetic by default) everywhere else. The other experts' scores are not used.

``stitch``
    Localize-and-Stitch (He et al. 2024, arXiv 2408.13656) with any score source in place of
    per-entry magnitudes: ``m_i`` marks the entries of expert ``i``'s selected components (by
    default its top ``fraction`` = 10% of scored components), and
    ``merged = base + strength * sum_i m_i delta_i / max(1, sum_i m_i)`` (``conflict="mean"``);
    with ``conflict="drop"`` entries selected by several experts stay at the base (LED-Merging's
    disjoint step). Nothing outside the masks changes (``rest=0``).

``score_weighted``
    Per-entry weight of expert ``i`` = ``max(floor, scale * s_i(c))`` where ``s_i(c)`` is the
    normalized score of the component covering the entry (several: the largest), ``floor`` where
    expert ``i`` scored nothing (or only components outside ``top_k``/``threshold`` when given).
    These weights multiply the standard merge's per-expert weights inside its formula
    (task arithmetic by default: ``base + lam * sum_i w_i * W_i * delta_i``).

Memory: per tensor, one float32 mask per expert of the tensor's size on top of the deltas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from weightpatch.components import ComponentSpace, ParamSlice
from weightpatch.errors import WeightPatchError
from weightpatch.merging.methods import MergeConfig
from weightpatch.merging.registry import RULES, default

Variant = Literal["owner_takes_top", "score_weighted", "protect_then_add", "stitch"]
VARIANTS: tuple[str, ...] = tuple(RULES)
OWNERSHIP: frozenset[str] = frozenset({"owner_takes_top", "protect_then_add", "stitch"})  # owner-based rules
Conflict = Literal["max", "blend", "mean", "drop"]
CONFLICTS: tuple[str, ...] = ("max", "blend", "mean", "drop")


def load_scores(scores: Any, component_col: str = "component", score_col: str = "score") -> dict[str, float]:
    """A ``component -> score`` dict from a mapping or a DataFrame (columns ``component``,
    ``score``). NaN scores are dropped; duplicate components are an error."""
    if isinstance(scores, Mapping):
        items = [(str(k), float(v)) for k, v in scores.items()]
    elif hasattr(scores, "columns"):
        cols = list(scores.columns)
        if component_col not in cols or score_col not in cols:
            raise WeightPatchError(f"score table needs columns {component_col!r} and {score_col!r}; it has {cols}")
        items = [(str(c), float(s)) for c, s in zip(scores[component_col], scores[score_col], strict=True)]
    else:
        raise WeightPatchError(f"scores must be a dict or a DataFrame, got {type(scores).__name__}")
    out: dict[str, float] = {}
    for c, s in items:
        if math.isnan(s):
            continue
        if c in out:
            raise WeightPatchError(f"component {c!r} appears twice in a score table")
        out[c] = s
    return out


def normalized_scores(scores: Mapping[str, float]) -> dict[str, float]:
    """Clip at 0 and divide by the largest score (all zeros if no score is positive)."""
    top = max((s for s in scores.values() if s > 0), default=0.0)
    return {c: (max(s, 0.0) / top if top > 0 else 0.0) for c, s in scores.items()}


def select_components(
    scores: Mapping[str, float],
    top_k: int | None = None,
    threshold: float | None = None,
    fraction: float | None = None,
) -> list[str]:
    """Components with raw score ``>= threshold`` (if given), then the ``top_k`` highest of those
    (if given), or the top ``ceil(fraction * len(scores))`` (if given; the fraction is of the whole
    table); ordered by score descending, then name."""
    items = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    if threshold is not None:
        items = [kv for kv in items if kv[1] >= threshold]
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise WeightPatchError(f"fraction must be in (0, 1], got {fraction}")
        items = items[: math.ceil(fraction * len(scores))]
    if top_k is not None:
        items = items[:top_k]
    return [c for c, _ in items]


def slice_regions(t: torch.Tensor, sl: ParamSlice) -> list[torch.Tensor]:
    """The views of ``t`` that slice ``sl`` covers (one per index range; the whole tensor when
    ``sl`` is whole)."""
    t = sl.region(t)
    if sl.dim is None:
        return [t]
    return [t.narrow(sl.dim, a, b - a) for a, b in sl.ranges]


@dataclass
class MechanismMerge:
    """A mechanism-aware merge; use :func:`owner_takes_top` / :func:`score_weighted` to build one.

    ``scores``: one score table per expert (same order as the expert checkpoints).
    ``protect``: ``protect_then_add``, the index of the protected expert.
    """

    space: ComponentSpace
    scores: Sequence[Any]
    variant: Variant = "owner_takes_top"
    standard: MergeConfig = field(default_factory=MergeConfig)
    top_k: int | None = None
    threshold: float | None = None
    strength: float = 1.0
    floor: float = 0.3
    scale: float = 1.0
    conflict: Conflict = "max"
    others: float = 0.0
    rest: float = 1.0
    fraction: float | None = None
    protect: int = 0
    _entries: dict[str, list[tuple[int, ParamSlice, float]]] = field(init=False, repr=False)
    selected: list[list[str]] = field(init=False)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise WeightPatchError(f"unknown mechanism-aware variant {self.variant!r}; choose {VARIANTS}")
        if self.conflict not in CONFLICTS:
            raise WeightPatchError(f"unknown ownership conflict rule {self.conflict!r}; choose {CONFLICTS}")
        if self.variant in OWNERSHIP and self.top_k is None and self.threshold is None and self.fraction is None:
            raise WeightPatchError(
                f"{self.variant} needs top_k, fraction or threshold to choose each expert's components"
            )
        tables = [load_scores(s) for s in self.scores]
        if not tables:
            raise WeightPatchError("mechanism-aware merge needs one score table per expert")
        if self.variant == "protect_then_add":
            if not 0 <= self.protect < len(tables):
                raise WeightPatchError(f"protect={self.protect}: expected an expert index from 0 to {len(tables) - 1}")
            tables = [t if i == self.protect else {} for i, t in enumerate(tables)]
        self.scores = tables
        if self.standard.weights is not None and len(self.standard.weights) != len(tables):
            raise WeightPatchError(f"{len(self.standard.weights)} standard weights for {len(tables)} score tables")
        self._entries = {}
        self.selected = []
        for i, table in enumerate(tables):
            norm = normalized_scores(table)
            chosen = select_components(table, self.top_k, self.threshold, self.fraction)
            if self.variant == "score_weighted" and self.top_k is None and self.threshold is None:
                chosen = list(table) if self.fraction is None else chosen
            self.selected.append(chosen)
            for comp in chosen:
                value = norm[comp] if self.variant in OWNERSHIP else self.scale * norm[comp]
                for sl in self.space.resolve(comp):
                    self._entries.setdefault(sl.name, []).append((i, sl, value))

    @property
    def num_experts(self) -> int:
        return len(self.scores)

    def parameters_touched(self) -> list[str]:
        """Canonical parameter names on which the coefficients differ from the standard merge."""
        return sorted(self._entries)

    def _canonical(self, name: str) -> str:
        return self.space.aliases.get(name, name)

    def ownership(self, name: str, shape: Sequence[int]) -> torch.Tensor | None:
        """``owner_takes_top``: a float tensor ``(num_experts, *shape)``, the normalized score of
        expert ``i``'s best selected component covering each entry, ``-inf`` where ``i`` owns
        nothing (None when no expert owns anything in this parameter)."""
        entries = self._entries.get(self._canonical(name))
        if not entries or self.variant not in OWNERSHIP:
            return None
        best = torch.full((self.num_experts, *shape), -math.inf)
        for i, sl, v in entries:
            for region in slice_regions(best[i], sl):
                region.clamp_(min=v)
        return best

    def owner_map(self, name: str, shape: Sequence[int]) -> torch.Tensor | None:
        """``owner_takes_top``: an int64 tensor of ``shape``, the expert with the highest owning
        score per entry (equal: the lower index) or -1 where nobody owns it."""
        best = self.ownership(name, shape)
        if best is None:
            return None
        owner = torch.full(tuple(shape), -1, dtype=torch.int64)
        top = torch.full(tuple(shape), -math.inf)
        for i in range(self.num_experts):
            better = best[i] > top
            owner[better] = i
            top = torch.maximum(top, best[i])
        return owner

    def owner_coefficients(self, name: str, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``owner_takes_top``: ``(owned, coef)``, the bool mask of owned entries (``shape``) and
        each expert's delta coefficient there, ``(num_experts, *shape)``: ``strength * a_i`` for
        the winners ``W(x)``, ``others * lam * w_j`` for every other expert (module docstring).
        Zero on unowned entries, where the standard merge applies."""
        best = self.ownership(name, shape)
        if best is None:
            return None
        owned_by = best > -math.inf
        owned = owned_by.any(0)
        count = owned_by.sum(0)
        if self.conflict == "max":
            owner = self.owner_map(name, shape)
            assert owner is not None
            winners = torch.stack([owner == i for i in range(self.num_experts)])
            share = winners.float()
        elif self.conflict in ("mean", "drop"):
            winners = owned_by
            share = owned_by.float() / count.clamp(min=1)
            if self.conflict == "drop":
                owned = count == 1
        else:
            winners = owned_by
            s = torch.where(owned_by, best.clamp(min=0), torch.zeros(()))
            total = s.sum(0)
            even = owned_by.float() / owned_by.sum(0).clamp(min=1)
            share = torch.where(total > 0, s / torch.where(total > 0, total, torch.ones(())), even)
        w = torch.tensor(self._standard_weights()).reshape(-1, *([1] * len(shape)))
        others = self.others * self.standard.lam * w * (~winners).float()
        coef = (self.strength * share + others) * owned.float()
        return owned, coef

    def score_weights(self, name: str, shape: Sequence[int]) -> list[torch.Tensor] | None:
        """``score_weighted``: the per-entry weight tensor of each expert (None when no expert
        scored anything in this parameter: every expert then gets ``floor``)."""
        entries = self._entries.get(self._canonical(name))
        if not entries or self.variant != "score_weighted":
            return None
        weights = [torch.full(tuple(shape), float(self.floor)) for _ in range(self.num_experts)]
        for i, sl, v in entries:
            for region in slice_regions(weights[i], sl):
                region.clamp_(min=v)
        return weights

    def _standard_weights(self) -> list[float]:
        return list(self.standard.weights) if self.standard.weights is not None else [1.0] * self.num_experts

    def merge_tensor(self, name: str, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(experts) != self.num_experts:
            raise WeightPatchError(f"{len(experts)} expert tensors for {self.num_experts} score tables")
        shape = tuple(base.shape)
        w_std = self._standard_weights()
        if self.variant == "score_weighted":
            sw = self.score_weights(name, shape)
            if sw is None:
                weights: list[Any] = [w * self.floor for w in w_std]
            else:
                weights = [w * m for w, m in zip(w_std, sw, strict=True)]
            return self.standard.merge_tensor(name, base, experts, weights=weights)
        merged = self.standard.merge_tensor(name, base, experts)
        b = base.float()
        elsewhere = merged.float() if self.rest == 1 else b + self.rest * (merged.float() - b)
        owned_coef = self.owner_coefficients(name, shape)
        if owned_coef is None:
            return elsewhere.to(base.dtype) if self.rest != 1 else merged
        owned, coef = owned_coef
        on_owned = b.clone()
        for i, e in enumerate(experts):
            if bool((coef[i] != 0).any()):
                on_owned += coef[i] * (e.float() - b)
        return torch.where(owned, on_owned, elsewhere).to(base.dtype)

    def describe(self) -> dict[str, Any]:
        return {
            "mechanism_variant": self.variant,
            "standard": self.standard.describe(),
            "top_k": self.top_k,
            "threshold": self.threshold,
            "strength": self.strength,
            "floor": self.floor,
            "scale": self.scale,
            "conflict": self.conflict,
            "others": self.others,
            "rest": self.rest,
            "fraction": self.fraction,
            "protect": self.protect if self.variant == "protect_then_add" else None,
            "selected_components": self.selected,
            "scores_used": self.scores_used(),
        }

    def scores_used(self) -> list[list[dict[str, Any]]]:
        """Per expert, the selected components (the ones that set its coefficients) with their raw
        and normalized scores, best first: what the model card and the merge record list."""
        used = []
        for table, chosen in zip(self.scores, self.selected, strict=True):
            norm = normalized_scores(table)
            used.append([{"component": c, "score": table[c], "normalized": norm[c]} for c in chosen])
        return used


def owner_takes_top(
    space: ComponentSpace,
    scores: Sequence[Any],
    *,
    top_k: int | None = 10,
    threshold: float | None = None,
    standard: MergeConfig | None = None,
    strength: float = 1.0,
    conflict: Conflict = "max",
    others: float = 0.0,
    rest: float = 1.0,
    fraction: float | None = None,
) -> MechanismMerge:
    """Each expert's delta at ``strength`` on its top components (``top_k``, ``fraction`` or
    ``threshold``) (shared entries: the best-scored
    owner, or with ``conflict="blend"`` the owners in proportion to their scores; ``others`` of the
    other experts' deltas survive there), ``rest`` times the ``standard`` merge elsewhere
    (default: task arithmetic, unit weights, ``lam=1``)."""
    return MechanismMerge(
        space,
        scores,
        "owner_takes_top",
        standard or MergeConfig(),
        top_k,
        threshold,
        strength=strength,
        conflict=conflict,
        others=others,
        rest=rest,
        fraction=fraction,
    )


def protect_then_add(
    space: ComponentSpace,
    scores: Sequence[Any],
    *,
    protect: int = 0,
    top_k: int | None = None,
    fraction: float | None = None,
    threshold: float | None = None,
    standard: MergeConfig | None = None,
    strength: float = 1.0,
    others: float = 0.0,
) -> MechanismMerge:
    """Expert ``protect``'s delta at ``strength`` on its top components (``top_k``, ``fraction`` or
    ``threshold`` of its scores, none given: the registered fraction, 10%; the other experts' tables
    are ignored, give ``{}``), plus ``others`` of the other experts' weighted deltas there; the
    ``standard`` merge (default: task arithmetic) everywhere else."""
    if top_k is None and fraction is None and threshold is None:
        fraction = default("protect_then_add", "fraction")
    return MechanismMerge(
        space,
        scores,
        "protect_then_add",
        standard or MergeConfig(),
        top_k,
        threshold,
        strength=strength,
        others=others,
        fraction=fraction,
        protect=protect,
    )


def stitch(
    space: ComponentSpace,
    scores: Sequence[Any],
    *,
    fraction: float | None = None,
    top_k: int | None = None,
    threshold: float | None = None,
    strength: float = 1.0,
    conflict: Conflict = "mean",
) -> MechanismMerge:
    """Localize-and-Stitch with any scores: each expert's top ``fraction`` of scored components (or
    ``top_k`` / ``threshold``; none given: the registered fraction, 10%) mask its delta; masked
    deltas are stitched into the base at ``strength``, averaged where masks overlap
    (``conflict="drop"``: overlaps stay base)."""
    if top_k is None and fraction is None and threshold is None:
        fraction = default("stitch", "fraction")
    if conflict not in ("mean", "drop"):
        raise WeightPatchError(f"stitch resolves overlaps by mean or drop, not {conflict!r}")
    return MechanismMerge(
        space,
        scores,
        "stitch",
        MergeConfig(),
        top_k,
        threshold,
        strength=strength,
        conflict=conflict,
        rest=0.0,
        fraction=fraction,
    )


def score_weighted(
    space: ComponentSpace,
    scores: Sequence[Any],
    *,
    floor: float = 0.3,
    scale: float = 1.0,
    top_k: int | None = None,
    threshold: float | None = None,
    standard: MergeConfig | None = None,
    fraction: float | None = None,
) -> MechanismMerge:
    """Per-entry weights ``max(floor, scale * normalized score)`` inside ``standard``
    (default: task arithmetic, ``lam=1``), from every scored component or only the ``top_k`` /
    ``fraction`` / ``threshold`` selection."""
    return MechanismMerge(
        space,
        scores,
        "score_weighted",
        standard or MergeConfig(),
        top_k,
        threshold,
        floor=floor,
        scale=scale,
        fraction=fraction,
    )


def component_space_for_checkpoint(path: Any, include_kv: bool = False, revision: str | None = None) -> ComponentSpace:
    """A :class:`ComponentSpace` from a checkpoint's config.json and safetensors headers (no weights
    loaded); tied embeddings alias as for a loaded model. ``path``: anything a merge takes (a
    directory, a hub id with its ``revision``, a ``.gguf`` file), opened by
    :func:`~weightpatch.merging.stream.open_checkpoint`."""
    from transformers import AutoConfig

    from weightpatch.merging.stream import open_checkpoint

    checkpoint = open_checkpoint(path, revision)
    config = AutoConfig.from_pretrained(str(checkpoint.path))
    return ComponentSpace.from_shapes(config, dict(checkpoint.shapes), include_kv=include_kv)
