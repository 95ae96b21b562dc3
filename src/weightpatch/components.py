"""The component vocabulary (SPEC section 2): names, parsing, and the parameter slices each owns.

Component names are stable strings that parse back:

=========================  ========  ===============================================
name                       kind      owns
=========================  ========  ===============================================
``L5``                     layer     every parameter of decoder block 5
``L5.attn``, ``L5.mlp``    module    a whole attention block / MLP
``L5.attn.q`` ... ``.o``   module    one projection (also ``mlp.gate/up/down``, norms)
``embed``, ``unembed``,    module    model-level modules (no layer)
``norm.final``
``L12.attn.head7``         head      the Q rows and O columns of head 7 (plus, with
                                     ``include_kv=True``, the K/V rows of its KV group)
``L3.mlp.neuron1021``      neuron    the gate/up rows and the down column of neuron 1021
=========================  ========  ===============================================

Layer and head indices are 0-based. With tied embeddings ``unembed`` owns the same tensor as
``embed``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from weightpatch.architecture import ArchitectureSpec, ModelDims, Rule, architecture_for
from weightpatch.errors import ComponentError

Kind = Literal["layer", "module", "head", "neuron"]
KINDS: tuple[Kind, ...] = ("layer", "module", "head", "neuron")
ComponentClass = Literal[
    "block", "attention", "mlp", "projection", "norm", "embedding", "unembedding", "head", "neuron", "other"
]
COMPONENT_CLASSES: tuple[ComponentClass, ...] = (
    "block",
    "attention",
    "mlp",
    "projection",
    "norm",
    "embedding",
    "unembedding",
    "head",
    "neuron",
    "other",
)

_LAYER = re.compile(r"^L(\d+)$")
_HEAD = re.compile(r"^L(\d+)\.attn\.head(\d+)$")
_NEURON = re.compile(r"^L(\d+)\.mlp\.neuron(\d+)$")
_LAYER_MODULE = re.compile(r"^L(\d+)\.([a-z_][a-z0-9_.]*)$")
_GLOBAL_MODULE = re.compile(r"^[a-z_][a-z0-9_.]*$")


@dataclass(frozen=True, order=True)
class Component:
    """One unit of the vocabulary. ``layer`` is None for model-level modules; ``index`` is the head
    or neuron number, None otherwise; ``module`` is the module name (``"attn"``, ``"mlp.gate"``,
    ``"embed"``), ``"attn"`` for heads, ``"mlp"`` for neurons, None for layers."""

    kind: Kind
    layer: int | None = None
    module: str | None = None
    index: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "layer":
            return f"L{self.layer}"
        if self.kind == "head":
            return f"L{self.layer}.attn.head{self.index}"
        if self.kind == "neuron":
            return f"L{self.layer}.mlp.neuron{self.index}"
        return self.module if self.layer is None else f"L{self.layer}.{self.module}"  # type: ignore[return-value]

    def __str__(self) -> str:
        return self.name

    @property
    def component_class(self) -> ComponentClass:
        """What the component is, finer than :attr:`kind`: ``block`` (a decoder layer), ``attention``
        / ``mlp`` (a whole sub-block), ``projection`` (one of its linear maps, ``attn.q``,
        ``mlp.down``), ``norm`` (any normalization, ``norm.pre_attn``, ``attn.q_norm``,
        ``norm.final``), ``embedding`` (``embed``, ``pos_embed``), ``unembedding``, ``head``,
        ``neuron``; ``other`` for a module name outside this vocabulary."""
        if self.kind == "layer":
            return "block"
        if self.kind in ("head", "neuron"):
            return self.kind
        module = self.module or ""
        last = module.rsplit(".", 1)[-1]
        if module.startswith("norm") or last.endswith("norm"):
            return "norm"
        if module in ("embed", "pos_embed"):
            return "embedding"
        if module == "unembed":
            return "unembedding"
        if module in ("attn", "mlp"):
            return "attention" if module == "attn" else "mlp"
        if module.startswith(("attn.", "mlp.")):
            return "projection"
        return "other"

    @classmethod
    def parse(cls, name: str) -> Component:
        """Parse a component name (syntax only; :meth:`ComponentSpace.parse` also checks existence)."""
        name = name.strip()
        if m := _LAYER.match(name):
            return cls("layer", int(m[1]))
        if m := _HEAD.match(name):
            return cls("head", int(m[1]), "attn", int(m[2]))
        if m := _NEURON.match(name):
            return cls("neuron", int(m[1]), "mlp", int(m[2]))
        if m := _LAYER_MODULE.match(name):
            return cls("module", int(m[1]), m[2])
        if _GLOBAL_MODULE.match(name):
            return cls("module", None, name)
        raise ComponentError(
            f"cannot parse component name {name!r}; expected e.g. 'L5', 'L5.mlp', 'L12.attn.head7', "
            f"'L3.mlp.neuron1021' or 'embed'"
        )


@dataclass(frozen=True)
class ParamSlice:
    """A slice of one parameter: the index ranges ``[start, stop)`` along ``dim``, or the whole
    tensor when ``dim`` is None. ``name`` is the canonical parameter name in the receiver model."""

    name: str
    dim: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()

    @property
    def is_full(self) -> bool:
        return self.dim is None

    def index(self) -> torch.Tensor:
        """The selected indices along ``dim`` as a 1-D int64 tensor."""
        return torch.cat([torch.arange(a, b) for a, b in self.ranges])

    def numel(self, shape: Sequence[int]) -> int:
        """Number of parameter entries this slice covers in a tensor of ``shape``."""
        total = 1
        for s in shape:
            total *= s
        if self.dim is None:
            return total
        return total // shape[self.dim] * sum(b - a for a, b in self.ranges)


def _union_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[list[int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return tuple((a, b) for a, b in merged)


def merge_slices(slices: Iterable[ParamSlice]) -> list[ParamSlice]:
    """Union of slices, one :class:`ParamSlice` per parameter (a full slice absorbs partial ones)."""
    by_name: dict[str, list[ParamSlice]] = {}
    for s in slices:
        by_name.setdefault(s.name, []).append(s)
    merged = []
    for name, group in by_name.items():
        if any(s.is_full for s in group):
            merged.append(ParamSlice(name))
            continue
        dims = {s.dim for s in group}
        if len(dims) != 1:
            raise ValueError(f"slices of {name} along different dims {sorted(dims)} cannot be merged")
        merged.append(ParamSlice(name, group[0].dim, _union_ranges(r for s in group for r in s.ranges)))
    return merged


class ComponentSpace:
    """The vocabulary of one concrete model: which components exist and which slices each owns.

    Built from parameter names and shapes (of a model or a checkpoint), so it never needs weights.
    ``aliases`` maps tied parameter names (``lm_head.weight``) to their canonical name.
    ``include_kv`` adds each head's KV-group K/V rows to the head (shared under GQA).
    """

    def __init__(
        self,
        spec: ArchitectureSpec,
        dims: ModelDims,
        shapes: dict[str, tuple[int, ...]],
        aliases: dict[str, str] | None = None,
        include_kv: bool = False,
    ) -> None:
        self.spec, self.dims, self.shapes = spec, dims, shapes
        self.aliases = aliases or {}
        self.include_kv = include_kv

    @classmethod
    def from_model(cls, model: torch.nn.Module, include_kv: bool = False) -> ComponentSpace:
        spec = architecture_for(model.config)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        ids = {id(p): n for n, p in model.named_parameters()}
        aliases = {n: ids[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if n not in shapes}
        return cls(spec, spec.dims(model.config), shapes, aliases, include_kv)

    # ---- name lookup -------------------------------------------------------------------------
    def _canonical(self, name: str) -> str | None:
        name = self.aliases.get(name, name)
        return name if name in self.shapes else None

    def _layer_name(self, layer: int | None, rel: str) -> str:
        return rel if layer is None else self.spec.layer_prefix.format(layer=layer) + rel

    def _expand(self, rule: Rule, layer: int | None, unit: int | None, defaults: dict[str, Any]) -> list[ParamSlice]:
        if isinstance(rule, str):
            full = self._layer_name(layer, rule)
            if full.endswith(".") or full == "":
                names = {self._canonical(n) for n in list(self.shapes) + list(self.aliases) if n.startswith(full)}
                return [ParamSlice(n) for n in sorted(n for n in names if n)]
            canonical = self._canonical(full)
            return [ParamSlice(canonical)] if canonical else []
        rule = {**defaults, **rule}
        canonical = self._canonical(self._layer_name(layer, rule["param"]))
        if canonical is None:
            return []
        dim, d = int(rule["dim"]), self.dims
        offset = d.eval(rule.get("offset", 0))
        size = d.eval(rule["size"]) if "size" in rule else self.shapes[canonical][dim]
        stride = d.eval(rule.get("stride", size))
        kind = rule.get("unit")
        if kind == "all_heads":
            units = range(d.num_heads)
        elif kind == "kv_head":
            units = [unit // (d.num_heads // d.num_kv_heads)]  # type: ignore[operator]
        elif kind in ("head", "neuron"):
            units = [unit]  # type: ignore[list-item]
        else:
            units = [0]
        ranges = tuple((u * stride + offset, u * stride + offset + size) for u in units)
        return [ParamSlice(canonical, dim, ranges)]

    # ---- vocabulary --------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.dims.num_layers

    @property
    def num_heads(self) -> int:
        return self.dims.num_heads

    def num_neurons(self, layer: int) -> int:
        for rule in self.spec.neuron:
            canonical = self._canonical(self._layer_name(layer, rule["param"]))  # type: ignore[index]
            if canonical:
                return self.shapes[canonical][int(rule["dim"])]  # type: ignore[index]
        return 0

    def module_names(self, layer: int | None) -> list[str]:
        """Module names that own at least one parameter at this layer (None: model-level)."""
        table = self.spec.globals if layer is None else self.spec.modules
        return [m for m in table if self._resolve_module(layer, m)]

    def _resolve_module(self, layer: int | None, module: str) -> list[ParamSlice]:
        table = self.spec.globals if layer is None else self.spec.modules
        head_defaults = {"stride": "head_dim", "size": "head_dim"}
        return [s for rule in table.get(module, []) for s in self._expand(rule, layer, None, head_defaults)]

    def resolve(self, component: Component | str) -> list[ParamSlice]:
        """The merged parameter slices a component owns (validated first)."""
        c = self.validate(component)
        if c.kind == "layer":
            slices = self._expand(self.spec.layer_prefix.format(layer=c.layer), None, None, {})
        elif c.kind == "module":
            slices = self._resolve_module(c.layer, c.module)  # type: ignore[arg-type]
        elif c.kind == "head":
            hd = {"stride": "head_dim", "size": "head_dim"}
            groups = [("query", "head"), ("output", "head")]
            if self.include_kv:
                groups.append(("key_value", "kv_head"))
            slices = [
                s
                for group, unit in groups
                for rule in self.spec.head.get(group, [])
                for s in self._expand(rule, c.layer, c.index, {**hd, "unit": unit})
            ]
        else:
            nd = {"stride": 1, "size": 1, "unit": "neuron"}
            slices = [s for rule in self.spec.neuron for s in self._expand(rule, c.layer, c.index, nd)]
        return merge_slices(slices)

    def resolve_all(self, components: Iterable[Component | str]) -> list[ParamSlice]:
        """The union of the slices of several components."""
        return merge_slices(s for c in components for s in self.resolve(c))

    def components(self, kinds: Iterable[Kind] = KINDS, layers: Iterable[int] | None = None) -> Iterator[Component]:
        """Enumerate components in a stable order: model-level modules first, then per layer
        the layer, its modules, its heads, its neurons (filtered by ``kinds``)."""
        kinds = set(kinds)
        layer_list = range(self.num_layers) if layers is None else list(layers)
        if "module" in kinds and layers is None:
            yield from self.model_level_modules()
        for layer in layer_list:
            if "layer" in kinds:
                yield Component("layer", layer)
            if "module" in kinds:
                for m in self.module_names(layer):
                    yield Component("module", layer, m)
            if "head" in kinds:
                for h in range(self.num_heads):
                    yield Component("head", layer, "attn", h)
            if "neuron" in kinds:
                for j in range(self.num_neurons(layer)):
                    yield Component("neuron", layer, "mlp", j)

    def everything(self) -> list[Component]:
        """A component set whose union is every parameter: all layers plus model-level modules."""
        return [*self.model_level_modules(), *self.components(kinds=("layer",))]

    def model_level_modules(self) -> list[Component]:
        return [Component("module", None, m) for m in self.module_names(None)]

    def first_affected_layer(self, component: Component | str) -> int:
        """The first decoder block whose output the component's weights change: its own layer,
        0 for the input embeddings, ``num_layers`` for what acts after the last block (final norm,
        untied unembedding). With tied embeddings ``unembed`` owns the embedding, so it is 0."""
        first = self.num_layers
        embedding = {s.name for m in ("embed", "pos_embed") for s in self._resolve_module(None, m)}
        for piece in self.resolve(component):
            if piece.name in embedding:
                return 0
            for layer in range(first):
                if piece.name.startswith(self.spec.layer_prefix.format(layer=layer)):
                    first = layer
                    break
        return first

    def uncovered_parameters(self) -> list[str]:
        """Parameters that no layer or model-level module owns (a gap in the description)."""
        owned = {s.name for s in self.resolve_all(self.everything())}
        return sorted(set(self.shapes) - owned)

    # ---- validation --------------------------------------------------------------------------
    def _suggestion(self, c: Component) -> str | None:
        """The closest valid name: the same component in the last layer when only the layer is out
        of range, else the nearest layer/module name by spelling."""
        if c.layer is not None and c.layer >= self.num_layers:
            moved = Component(c.kind, self.num_layers - 1, c.module, c.index)
            try:
                return self.validate(moved).name
            except ComponentError:
                pass
        names = [x.name for x in self.components(kinds=("layer", "module"))]
        if c.layer is not None and 0 <= c.layer < self.num_layers:
            names += [f"L{c.layer}.attn.head0", f"L{c.layer}.mlp.neuron0"]
        close = difflib.get_close_matches(c.name, names, n=1, cutoff=0.5)
        return close[0] if close else None

    def validate(self, component: Component | str) -> Component:
        """Return the component if it exists in this model, else raise a :class:`ComponentError`
        naming the closest valid name."""
        c = Component.parse(component) if isinstance(component, str) else component
        problem = None
        if c.layer is not None and not 0 <= c.layer < self.num_layers:
            problem = f"layer {c.layer} is out of range (the model has layers 0..{self.num_layers - 1})"
        elif c.kind == "head" and not 0 <= c.index < self.num_heads:  # type: ignore[operator]
            problem = f"head {c.index} is out of range (layer {c.layer} has heads 0..{self.num_heads - 1})"
        elif c.kind == "neuron" and not 0 <= c.index < self.num_neurons(c.layer):  # type: ignore[operator,arg-type]
            problem = f"neuron {c.index} is out of range (layer {c.layer} has {self.num_neurons(c.layer)} neurons)"  # type: ignore[arg-type]
        elif c.kind == "module" and c.module not in self.module_names(c.layer):
            problem = (
                f"no module {c.module!r} {'in layer ' + str(c.layer) if c.layer is not None else 'at model level'}"
            )
        if problem is None:
            return c
        suggestion = self._suggestion(c)
        hint = f"; did you mean {suggestion!r}?" if suggestion else ""
        raise ComponentError(f"unknown component {c.name!r}: {problem}{hint}")

    def parse(self, name: str) -> Component:
        return self.validate(Component.parse(name))
