"""Supplier -> target tracing (docs/method.md, "Supplier tracing and hierarchy").

Targets are components whose *output* matters (typically the top activation-space heads, the
"routers"). For a target ``T`` and an upstream component ``S`` (a **supplier** candidate), the
supply score is how far patching ``S``'s **weights** into the base moves ``T``'s **output** toward
``T``'s output in the specialized model:

    d_x      = out_T(sft, x) - out_T(base, x)
    supply   = mean_x [ <out_T(base^(S <- sft), x) - out_T(base, x), d_x> / ||d_x||^2 ]

i.e. the fraction of ``T``'s base->sft output difference recovered by ``S`` alone (1 = all of it;
the projection ratio, so moves orthogonal to ``d_x`` do not count). ``out_T`` is ``T``'s
activation site (:func:`weightpatch.activation.site_of`: for a head, its slice of the input of the
output projection) read at the **last prompt token** (``positions="last"``, where the anchor is
read) or at every real token concatenated (``positions="all"``, padding excluded). Prompts whose
``||d_x||^2`` is below ``min_relative_gap`` times the median are excluded, as for anchor gaps.

Upstream rule: ``S`` is a candidate for ``T`` when ``first_affected_layer(S) < layer(T)``, or when
they share the layer and ``S`` is an attention component (head, ``attn*`` module) while ``T`` is an
MLP component (neuron, ``mlp*`` module) -- attention runs before the MLP in a sequential block
(with a parallel residual the score is then exactly 0). The embedding is upstream of every target.

Scoring: ``method="exact"`` patches each candidate (one segment run per candidate per batch);
``method="first_order"`` screens every candidate at once with the gradient of the supply
objective at the base weights times the weight delta (one backward per target per batch, reduced
per component with the same plan/reduce helpers as :mod:`weightpatch.screening.first_order`), and
``verify_top`` re-scores the best candidates of each target exactly (recommended for neurons).

Hierarchy levels (:func:`hierarchy`), a rule over the traced graph:

0. ``source``: kept suppliers (top ``k`` per target with supply >= ``min_supply``) that are not
   themselves targets;
1. ``router``: the targets (aggregate what sources write, ``traced`` says if any supplier was kept);
2. ``execution``: what acts on the formed control state: the decoder blocks above the anchor layer
   and, with a roles table, the activation-high components above the highest router layer;
3. ``unembedding``: the final norm and the unembedding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Literal

import pandas as pd
import torch

from weightpatch.activation import Positions, capturing, site_of
from weightpatch.components import Component, ComponentSpace, Kind, ParamSlice
from weightpatch.engine import run_blocks, sweep
from weightpatch.pair import Role
from weightpatch.patch import donor_values, patched
from weightpatch.results import ScoreTable
from weightpatch.runner import Batch, run_segment
from weightpatch.scoring import GapScorer
from weightpatch.screening.first_order import gradient_hooks, plan_reduction, reduce_into

logger = logging.getLogger("weightpatch")

EDGE_COLUMNS = [
    "target",
    "supplier",
    "supplier_kind",
    "supplier_layer",
    "target_layer",
    "supply",
    "n_prompts",
    "method",
]


def _is_attention(c: Component) -> bool:
    return c.kind == "head" or (c.kind == "module" and (c.module or "").startswith("attn"))


def _is_mlp(c: Component) -> bool:
    return c.kind == "neuron" or (c.kind == "module" and (c.module or "").startswith("mlp"))


def is_upstream(space: ComponentSpace, supplier: Component | str, target: Component | str) -> bool:
    """Whether ``supplier``'s weights can change ``target``'s output (the rule in the module doc)."""
    s, t = space.validate(supplier), space.validate(target)
    if s == t:
        return False
    first = space.first_affected_layer(s)
    if first >= space.num_layers:
        return False
    if s.layer is None and first == 0:
        return True
    t_layer = 0 if t.layer is None else t.layer
    if first < t_layer:
        return True
    return first == t_layer and _is_attention(s) and _is_mlp(t)


def candidates_for(
    space: ComponentSpace, targets: Sequence[Component | str], kinds: Iterable[Kind] = ("head", "neuron")
) -> list[Component]:
    """Every component of ``kinds`` that is upstream of at least one target."""
    targets = [space.validate(t) for t in targets]
    return [c for c in space.components(kinds=tuple(kinds)) if any(is_upstream(space, c, t) for t in targets)]


def _site_layer(c: Component) -> int:
    return 0 if c.layer is None else c.layer


class SupplyTracer:
    """Target outputs of the base and the specialized model on a scorer's prompts, and supply
    scores of candidate suppliers (see the module docstring)."""

    def __init__(
        self,
        scorer: GapScorer,
        targets: Sequence[Component | str],
        positions: Positions = "last",
        min_relative_gap: float = 0.1,
    ) -> None:
        pair = scorer.pair
        self.scorer, self.pair, self.space, self.model = scorer, pair, pair.space, pair.model
        self.batches: list[Batch] = scorer.batches
        self.targets = [self.space.validate(t) for t in targets]
        if not self.targets:
            raise ValueError("no targets to trace")
        self.sites = [site_of(self.space, t) for t in self.targets]
        self.positions = positions
        self.top = max(_site_layer(t) for t in self.targets)
        with torch.no_grad():
            scorer.block_inputs(max(self.top, scorer.stop))  # cached with the receiver's own weights
            everything = range(len(self.targets))
            self.out_base = list(self._outputs(self.model, 0, everything).values())
            donor_role: Role = "specialized" if pair.receiver == "base" else "base"
            with pair.as_model(donor_role, streamed=True) as donor_model:
                self.out_donor = list(self._outputs(donor_model, 0, everything).values())
        self.diff = [d - b for d, b in zip(self.out_donor, self.out_base, strict=True)]  # per target (prompt, dim)
        self.norm2 = [(d.double() ** 2).sum(-1) for d in self.diff]
        self.valid = [n > min_relative_gap * n.median() for n in self.norm2]

    # ---- target outputs ------------------------------------------------------------------------
    def _flatten(self, full: torch.Tensor, site, batch: Batch) -> torch.Tensor:
        x = full[..., site.start : site.stop] if site.start is not None else full
        if self.positions == "last":
            return x[:, -1]
        return (x * batch.attention_mask[..., None].to(x.dtype)).flatten(1)

    def _outputs(self, model, start: int, targets: Sequence[int]) -> dict[int, torch.Tensor]:
        """Outputs of the targets numbered ``targets`` (each ``(prompt, dim)`` over all batches),
        running blocks ``start..`` up to the highest of their layers. Every target must sit at or
        above ``start`` (below it, its site would not run)."""
        targets = list(targets)
        sites = [self.sites[k] for k in targets]
        stop = max(_site_layer(self.targets[k]) for k in targets)
        if min(_site_layer(self.targets[k]) for k in targets) < start:
            raise ValueError(f"a target below layer {start} cannot be read from a segment starting there")
        per_target: dict[int, list[torch.Tensor]] = {k: [] for k in targets}
        for i, b in enumerate(self.batches):
            store: dict = {}
            with capturing(model, sites, store):
                run_blocks(self.scorer, i, start, stop, last_position=False, model=model)
            for k, site in zip(targets, sites, strict=True):
                per_target[k].append(self._flatten(store[site.key], site, b).detach())
        return {k: torch.cat(parts) for k, parts in per_target.items()}

    def _ratios(self, k: int, out: torch.Tensor) -> tuple[float, int]:
        num = ((out - self.out_base[k]).double() * self.diff[k].double()).sum(-1)
        r = (num / self.norm2[k])[self.valid[k]]
        return float(r.mean()) if r.numel() else float("nan"), int(r.numel())

    # ---- scores --------------------------------------------------------------------------------
    def exact(self, candidates: Sequence[Component | str], progress: bool = False) -> pd.DataFrame:
        """Exact supply of each candidate for each target it is upstream of (edges table)."""
        cands = [self.space.validate(c) for c in candidates]
        return pd.DataFrame(sweep(_Suppliers(self), cands, progress=progress), columns=EDGE_COLUMNS)

    def first_order(self, candidates: Sequence[Component | str]) -> pd.DataFrame:
        """First-order supply of every candidate for every target at once (edges table)."""
        cands = [self.space.validate(c) for c in candidates]
        plans = plan_reduction(self.pair.space, cands)
        scores = torch.zeros(len(self.targets), len(cands), dtype=torch.float64)
        deltas: dict[str, torch.Tensor] = {}
        state = {"target": 0}

        def on_grad(name: str, param: torch.Tensor) -> None:
            if name not in deltas:
                deltas[name] = (donor_values(self.pair.donor, ParamSlice(name), param) - param).double()
            reduce_into(param.grad.double() * deltas[name], plans[name], scores[state["target"]])

        weights = [
            torch.where(v, 1.0 / n, torch.zeros_like(n)) / v.sum().clamp(min=1)
            for v, n in zip(self.valid, self.norm2, strict=True)
        ]
        with gradient_hooks(self.model, plans, on_grad):
            offset = 0
            for b in self.batches:
                store: dict = {}
                with capturing(self.model, self.sites, store):
                    run_segment(self.model, self.space, b, stop=self.top)
                rows = slice(offset, offset + len(b))
                offset += len(b)
                for k, site in enumerate(self.sites):
                    out = self._flatten(store[site.key], site, b)
                    objective = (out.double() * self.diff[k][rows].double()).sum(-1) @ weights[k][rows]
                    if objective.requires_grad:
                        state["target"] = k
                        objective.backward(retain_graph=k < len(self.sites) - 1)
                del store
        rows_out = []
        for k, t in enumerate(self.targets):
            n = int(self.valid[k].sum())
            for j, s in enumerate(cands):
                if is_upstream(self.space, s, t):
                    rows_out.append(self._edge(k, s, float(scores[k, j]), n, "first_order"))
        return pd.DataFrame(rows_out, columns=EDGE_COLUMNS)

    def _edge(self, k: int, s: Component, value: float, n: int, method: str) -> dict:
        t = self.targets[k]
        return {
            "target": t.name,
            "supplier": s.name,
            "supplier_kind": s.kind,
            "supplier_layer": s.layer,  # None (a null in the table) for model-level modules
            "target_layer": t.layer,
            "supply": value,
            "n_prompts": n,
            "method": method,
        }


class _Suppliers:
    """The supplier strategy of the sweep: each candidate's weights patched alone, the targets it
    is upstream of read from a segment starting at its first affected block (one candidate per
    forward; a candidate above every target gives no rows)."""

    method = "exact"
    variants_per_batch = 1

    def __init__(self, tracer: SupplyTracer) -> None:
        self.tracer = tracer

    @property
    def stop(self) -> int:
        return self.tracer.top

    def key(self, item: Component) -> str:
        return item.name

    def first_layer(self, item: Component) -> int:
        return self.tracer.space.first_affected_layer(item)

    def rows(self, group: Sequence[Component], layer: int) -> list[list[dict]]:
        t = self.tracer
        out: list[list[dict]] = []
        for s in group:
            eligible = [k for k, target in enumerate(t.targets) if is_upstream(t.space, s, target)]
            if not eligible:
                out.append([])
                continue
            # only the targets above the supplier are read, so the segment may start at its layer
            with patched(t.model, t.pair.donor, t.space, [s]):
                outs = t._outputs(t.model, layer, eligible)
            out.append([t._edge(k, s, *t._ratios(k, outs[k]), "exact") for k in eligible])
        return out

    def zero_rows(self, group: Sequence[Component]) -> list[list[dict]]:
        return [[] for _ in group]


def trace_suppliers(
    scorer: GapScorer,
    targets: Sequence[Component | str],
    candidates: Sequence[Component | str] | None = None,
    kinds: Iterable[Kind] = ("head", "neuron"),
    method: Literal["exact", "first_order"] = "exact",
    verify_top: int = 0,
    positions: Positions = "last",
    min_relative_gap: float = 0.1,
) -> pd.DataFrame:
    """Supply edges (``target, supplier, supplier_kind, supplier_layer, target_layer, supply,
    n_prompts, method``) sorted by target then supply (descending).

    ``candidates`` default to every component of ``kinds`` upstream of some target. With
    ``method="first_order"`` and ``verify_top > 0`` the top ``verify_top`` candidates of each
    target are re-scored exactly and their rows replaced (method ``"exact"``)."""
    tracer = SupplyTracer(scorer, targets, positions, min_relative_gap)
    cands = list(candidates) if candidates is not None else candidates_for(scorer.pair.space, tracer.targets, kinds)
    if method == "exact":
        edges = tracer.exact(cands)
    elif method == "first_order":
        edges = tracer.first_order(cands)
        if verify_top > 0 and len(edges):
            top = edges.sort_values("supply", ascending=False).groupby("target").head(verify_top)
            exact = tracer.exact(sorted(set(top["supplier"]), key=str))
            exact = exact.merge(top[["target", "supplier"]], on=["target", "supplier"])
            keyed = edges.set_index(["target", "supplier"])
            keyed = keyed.drop(index=list(zip(exact["target"], exact["supplier"], strict=True)), errors="ignore")
            edges = pd.concat([keyed.reset_index(), exact], ignore_index=True)[EDGE_COLUMNS]
    else:
        raise ValueError(f"unknown tracing method {method!r}; use 'exact' or 'first_order'")
    edges = edges.astype({"supplier_layer": "Int64", "target_layer": "Int64"})
    return edges.sort_values(["target", "supply"], ascending=[True, False]).reset_index(drop=True)


def top_suppliers(edges: pd.DataFrame, k: int = 5, min_supply: float = 0.0) -> pd.DataFrame:
    """The ``k`` best suppliers of each target with ``supply >= min_supply``."""
    kept = edges[edges["supply"] >= min_supply]
    return kept.sort_values("supply", ascending=False).groupby("target", sort=False).head(k).reset_index(drop=True)


def supplier_graph(edges: pd.DataFrame, k: int = 5, min_supply: float = 0.0):
    """A ``networkx.DiGraph`` supplier -> target with ``supply`` as the edge weight (top ``k`` per
    target), if networkx is installed; otherwise the kept edges as a DataFrame."""
    kept = top_suppliers(edges, k, min_supply)
    try:
        import networkx as nx
    except ImportError:
        return kept
    graph = nx.DiGraph()
    for row in kept.itertuples(index=False):
        graph.add_edge(row.supplier, row.target, weight=row.supply, method=row.method)
    return graph


def hierarchy(
    edges: pd.DataFrame,
    space: ComponentSpace,
    anchor_layer: int,
    roles: pd.DataFrame | None = None,
    k: int = 5,
    min_supply: float = 0.05,
) -> pd.DataFrame:
    """Hierarchy levels (rule in the module docstring): ``component, level, level_name, layer,
    traced`` (``traced``: a router with at least one kept supplier; ``layer`` null for the
    model-level final norm and unembedding)."""
    kept = top_suppliers(edges, k, min_supply)
    targets = list(dict.fromkeys(edges["target"]))
    routed = set(kept["target"])
    rows = []
    for s in dict.fromkeys(kept["supplier"]):
        if s not in targets:
            rows.append((s, 0, "source", _layer(space, s), True))
    for t in targets:
        rows.append((t, 1, "router", _layer(space, t), t in routed))
    top_router = max((layer for t in targets if (layer := _layer(space, t)) is not None), default=-1)
    seen = {r[0] for r in rows}
    execution = [f"L{layer}" for layer in range(anchor_layer + 1, space.num_layers)]
    if roles is not None:
        high = roles[roles["activation_high"] & (roles["layer"] > top_router)]
        execution = list(dict.fromkeys([*high["component"], *execution]))
    for c in execution:
        if c not in seen:
            rows.append((c, 2, "execution", _layer(space, c), False))
    for m in ("norm.final", "unembed"):
        if m in space.module_names(None):
            rows.append((m, 3, "unembedding", None, False))  # model-level: null layer, as in score tables
    levels = pd.DataFrame(rows, columns=["component", "level", "level_name", "layer", "traced"])
    return levels.astype({"layer": "Int64"})


def _layer(space: ComponentSpace, name: str) -> int | None:
    return space.parse(name).layer


def supplier_overlap(
    edges: pd.DataFrame,
    weight_table: ScoreTable,
    k: int = 10,
    method: str = "exact",
    kind: str | None = "neuron",
    min_supply: float = 0.0,
) -> dict:
    """Overlap of traced suppliers with Weight Patching's top-``k``.

    Traced suppliers: the ``k`` components (of ``kind``) with the largest supply to any target
    (max over targets, ``supply >= min_supply``). Weight Patching top-``k``: the ``k`` largest signed
    scores of ``method`` and ``kind``. Warns when either side has fewer than ``k`` (e.g. only the
    verified neurons have exact scores). ``fraction`` = |traced ∩ WP| / |traced| (the paper reports ~0.75)."""
    e = edges if kind is None else edges[edges["supplier_kind"] == kind]
    e = e[e["supply"] >= min_supply]
    best = e.groupby("supplier")["supply"].max().sort_values(ascending=False)
    traced = list(best.index[:k])
    wp = weight_table.top(k, method=method, kind=kind, by_abs=False).components()
    if len(traced) < k or len(wp) < k:
        logger.warning(
            "supplier overlap at k=%d compares %d traced suppliers with %d Weight Patching %s scores (%s): "
            "fewer were scored",
            k,
            len(traced),
            len(wp),
            kind or "",
            method,
        )
    shared = [c for c in traced if c in set(wp)]
    return {
        "k": k,
        "fraction": len(shared) / len(traced) if traced else float("nan"),
        "traced": traced,
        "weight_patching": wp,
        "shared": shared,
    }
