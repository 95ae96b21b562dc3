"""The component vocabulary (docs/method.md, "Components"): names, parsing, and the parameter slices each owns.

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
``L3.mlp.expert5``         expert    expert 5's slab of the fused expert tensors
                                     (mixture-of-experts families; ``L3.mlp.router``
                                     is the router module)
``L3.mlp.expert5.neuron17``  expert_   neuron 17 of expert 5: its gate/up rows and down
                           neuron    column inside the expert's slab
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

from weightpatch.architecture import ArchitectureSpec, ModelDims, Rule, SliceRule, architecture_for
from weightpatch.errors import ArchitectureDescriptionError, ComponentError

Kind = Literal["layer", "module", "head", "neuron", "expert", "expert_neuron"]
KINDS: tuple[Kind, ...] = ("layer", "module", "head", "neuron", "expert", "expert_neuron")
ComponentClass = Literal[
    "block", "attention", "mlp", "projection", "norm", "embedding", "unembedding", "head", "neuron", "expert", "other"
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
    "expert",
    "other",
)

_LAYER = re.compile(r"^L(\d+)$")
_HEAD = re.compile(r"^L(\d+)\.attn\.head(\d+)$")
_NEURON = re.compile(r"^L(\d+)\.mlp\.neuron(\d+)$")
_EXPERT = re.compile(r"^L(\d+)\.mlp\.expert(\d+)$")
_EXPERT_NEURON = re.compile(r"^L(\d+)\.(mlp\.expert\d+)\.neuron(\d+)$")
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
        if self.kind == "expert":
            return f"L{self.layer}.mlp.expert{self.index}"
        if self.kind == "expert_neuron":
            return f"L{self.layer}.{self.module}.neuron{self.index}"
        return self.part if self.layer is None else f"L{self.layer}.{self.part}"

    def __str__(self) -> str:
        return self.name

    # typed views of the optional fields, for the kinds that always have them (parse guarantees it)
    @property
    def in_layer(self) -> int:
        """The layer of a per-layer component; :class:`ComponentError` for a model-level module."""
        if self.layer is None:
            raise ComponentError(f"{self.part} is a model-level module: it belongs to no layer")
        return self.layer

    @property
    def unit(self) -> int:
        """The head, neuron or expert number; :class:`ComponentError` for a layer or a module."""
        if self.index is None:
            raise ComponentError(f"a {self.kind} component has no head, neuron or expert number")
        return self.index

    @property
    def part(self) -> str:
        """The module name (``attn`` for heads, ``mlp`` for neurons); :class:`ComponentError` for a layer."""
        if self.module is None:
            raise ComponentError(f"a {self.kind} component names no module")
        return self.module

    @property
    def expert(self) -> int | None:
        """The expert number of an expert or an expert's neuron (``module`` is ``"mlp.expert5"``
        for ``L3.mlp.expert5.neuron17``), None otherwise."""
        if self.kind == "expert":
            return self.index
        if self.kind == "expert_neuron":
            return int(self.part.removeprefix("mlp.expert"))
        return None

    @property
    def component_class(self) -> ComponentClass:
        """What the component is, finer than :attr:`kind`: ``block`` (a decoder layer), ``attention``
        / ``mlp`` (a whole sub-block), ``projection`` (one of its linear maps, ``attn.q``,
        ``mlp.down``), ``norm`` (any normalization, ``norm.pre_attn``, ``attn.q_norm``,
        ``norm.final``), ``embedding`` (``embed``, ``pos_embed``), ``unembedding``, ``head``,
        ``neuron``, ``expert`` (a mixture-of-experts expert; an expert's neuron is a ``neuron``); ``other``
        for a module name outside this vocabulary."""
        if self.kind == "layer":
            return "block"
        if self.kind in ("head", "neuron", "expert"):
            return self.kind
        if self.kind == "expert_neuron":
            return "neuron"
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
        if m := _EXPERT.match(name):
            return cls("expert", int(m[1]), "mlp", int(m[2]))
        if m := _EXPERT_NEURON.match(name):
            return cls("expert_neuron", int(m[1]), m[2], int(m[3]))
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
    tensor when ``dim`` is None. ``name`` is the canonical parameter name in the receiver model.

    ``expert`` (fused mixture-of-experts tensors only): the slice lies inside expert ``expert``'s
    slab ``tensor[expert : expert + 1]`` of a tensor whose dim 0 counts experts; ``dim`` still
    counts the full tensor's dims. Readers and writers index :meth:`region` of the tensor, which
    is the tensor itself when ``expert`` is None."""

    name: str
    dim: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()
    expert: int | None = None

    @property
    def is_full(self) -> bool:
        return self.dim is None and self.expert is None

    def region(self, tensor: torch.Tensor) -> torch.Tensor:
        """The view of ``tensor`` that ``dim``/``ranges`` index: the expert's slab (dim 0 kept,
        size 1) or the whole tensor."""
        return tensor if self.expert is None else tensor.narrow(0, self.expert, 1)

    def index(self) -> torch.Tensor:
        """The selected indices along ``dim`` as a 1-D int64 tensor."""
        return torch.cat([torch.arange(a, b) for a, b in self.ranges])

    def numel(self, shape: Sequence[int]) -> int:
        """Number of parameter entries this slice covers in a tensor of ``shape``."""
        total = 1
        for s in shape:
            total *= s
        if self.expert is not None:
            total //= shape[0]
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
    """Union of slices, one :class:`ParamSlice` per parameter and expert slab (a full slice absorbs
    partial ones; a dim-0 slice of whole experts absorbs slices inside those experts)."""
    by_name: dict[str, list[ParamSlice]] = {}
    for s in slices:
        by_name.setdefault(s.name, []).append(s)
    merged = []
    for name, group in by_name.items():
        if any(s.is_full for s in group):
            merged.append(ParamSlice(name))
            continue
        whole = [s for s in group if s.expert is None]
        if whole:
            dims = {s.dim for s in whole}
            if len(dims) != 1:
                raise ValueError(f"slices of {name} along different dims {sorted(dims)} cannot be merged")
            merged.append(ParamSlice(name, whole[0].dim, _union_ranges(r for s in whole for r in s.ranges)))
        covered = {e for a, b in merged[-1].ranges for e in range(a, b)} if whole and whole[0].dim == 0 else set()
        inside: dict[int, list[ParamSlice]] = {}
        for s in group:
            if s.expert is not None and s.expert not in covered:
                inside.setdefault(s.expert, []).append(s)
        for expert, parts in sorted(inside.items()):
            if whole and whole[0].dim != 0:
                raise ValueError(
                    f"slices of {name} along dim {whole[0].dim} and inside expert {expert} cannot be merged"
                )
            dims = {s.dim for s in parts}
            if len(dims) != 1:
                raise ValueError(f"slices of {name} in expert {expert} along different dims {sorted(dims)}")
            merged.append(ParamSlice(name, parts[0].dim, _union_ranges(r for s in parts for r in s.ranges), expert))
    return merged


@dataclass(frozen=True)
class Site:
    """Where a component's activation lives: a submodule path, whether it is that submodule's first
    input (``"pre"``) or first output tensor (``"post"``), and the channel range ``[start, stop)`` of
    the last dimension (``None``: all channels)."""

    module: str
    hook: Literal["pre", "post"]
    start: int | None = None
    stop: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.module, self.hook


class ComponentSpace:
    """The vocabulary of one concrete model: which components exist, which slices each owns, and
    where each one's activation is (its :class:`Site`).

    Built from parameter names and shapes (of a model or a checkpoint), so it never needs weights.
    ``aliases`` maps tied parameter names (``lm_head.weight``) to their canonical name.
    ``include_kv`` adds each head's KV-group K/V rows to the head (shared under GQA).
    Raises :class:`ArchitectureDescriptionError` when some parameter is owned by no module of the
    description (a gap that would otherwise show up as a wrong score).
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
        uncovered = self.uncovered_parameters()
        if uncovered:
            listed = ", ".join(uncovered[:8]) + (f" and {len(uncovered) - 8} more" if len(uncovered) > 8 else "")
            raise ArchitectureDescriptionError(
                f"{spec.family}.json: no module owns the parameters {listed}; add them to 'modules' "
                f"(per layer) or 'globals' of the description"
            )

    @classmethod
    def from_model(cls, model: torch.nn.Module, include_kv: bool = False) -> ComponentSpace:
        """The space of a loaded (or meta-device) model."""
        return cls.from_shapes(
            model.config, {n: tuple(p.shape) for n, p in model.named_parameters()}, include_kv=include_kv
        )

    @classmethod
    def from_shapes(cls, config: Any, shapes: dict[str, tuple[int, ...]], include_kv: bool = False) -> ComponentSpace:
        """The space of a model given its config and parameter shapes (e.g. read from checkpoint
        headers); tied embeddings are aliased by :meth:`ArchitectureSpec.tied_aliases`."""
        spec = architecture_for(config)
        return cls(spec, spec.dims(config), shapes, spec.tied_aliases(config, shapes), include_kv)

    # ---- name lookup -------------------------------------------------------------------------
    def _canonical(self, name: str) -> str | None:
        name = self.aliases.get(name, name)
        return name if name in self.shapes else None

    def _prefixed(self, prefix: str) -> list[ParamSlice]:
        names = {self._canonical(n) for n in list(self.shapes) + list(self.aliases) if n.startswith(prefix)}
        return [ParamSlice(n) for n in sorted(n for n in names if n)]

    def _expand(self, rule: Rule, layer: int | None, unit: int | None, defaults: dict[str, Any]) -> list[ParamSlice]:
        """The slices one rule selects for unit index ``unit`` (head, neuron); ``defaults`` fills
        the rule's unset ``size``/``stride``/``unit``."""
        if isinstance(rule, str):
            full = self.spec.param_name(layer, rule)
            if full.endswith("."):
                return self._prefixed(full)
            canonical = self._canonical(full)
            return [ParamSlice(canonical)] if canonical else []
        canonical = self._canonical(self.spec.param_name(layer, rule.param))
        if canonical is None:
            return []
        d = self.dims
        offset = d.eval(rule.offset)
        size_expr = rule.size if rule.size is not None else defaults.get("size")
        size = d.eval(size_expr) if size_expr is not None else self.shapes[canonical][rule.dim]
        stride = d.eval(rule.stride if rule.stride is not None else defaults.get("stride", size))
        kind = rule.unit or defaults.get("unit")
        if kind == "all_heads":
            units = range(d.num_heads)
        elif kind == "kv_head":
            units = [unit // (d.num_heads // d.num_kv_heads)]  # type: ignore[operator]
        elif kind in ("head", "neuron", "expert"):
            units = [unit]  # type: ignore[list-item]
        else:
            units = [0]
        ranges = tuple((u * stride + offset, u * stride + offset + size) for u in units)
        return [ParamSlice(canonical, rule.dim, ranges)]

    # ---- vocabulary --------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.dims.num_layers

    @property
    def num_heads(self) -> int:
        return self.dims.num_heads

    def num_neurons(self, layer: int) -> int:
        """Neurons of the MLP of ``layer``: the largest count for which every neuron rule present in
        the model stays inside its tensor (so a fused ``gate_up_proj`` of ``2*intermediate_size``
        rows, sliced twice, counts ``intermediate_size``)."""
        return self._unit_count(layer, self.spec.neuron)

    def num_expert_neurons(self, layer: int) -> int:
        """Neurons of each expert of ``layer`` (0 without experts)."""
        if not self.num_experts(layer):
            return 0
        return self._unit_count(layer, self.spec.experts.neuron)  # type: ignore[union-attr]

    def _unit_count(self, layer: int, rules: Sequence[SliceRule]) -> int:
        counts = []
        for rule in rules:
            canonical = self._canonical(self.spec.param_name(layer, rule.param))
            if canonical is None:
                continue
            size, stride = (self.dims.eval(e) if e is not None else 1 for e in (rule.size, rule.stride))
            extent = self.shapes[canonical][rule.dim] - self.dims.eval(rule.offset)
            counts.append((extent - size) // stride + 1)
        return max(0, min(counts, default=0))

    def num_experts(self, layer: int) -> int:
        """Experts of the mixture-of-experts MLP of ``layer`` (0 for dense layers and families)."""
        if self.spec.experts is None or not self.dims.num_experts:
            return 0
        present = [self.spec.param_name(layer, r.param) for r in self.spec.experts.expert]
        return self.dims.num_experts if any(self._canonical(n) for n in present) else 0

    def module_names(self, layer: int | None) -> list[str]:
        """Module names that own at least one parameter at this layer (None: model-level)."""
        table = self.spec.globals if layer is None else self.spec.modules
        return [m for m in table if self._resolve_module(layer, m)]

    def _resolve_module(self, layer: int | None, module: str) -> list[ParamSlice]:
        table = self.spec.globals if layer is None else self.spec.modules
        per_head = {"stride": "head_dim", "size": "head_dim"}  # for "all_heads" rules (fused per-head layouts)
        return [
            s
            for rule in table.get(module, [])
            for s in self._expand(rule, layer, None, per_head if getattr(rule, "unit", None) == "all_heads" else {})
        ]

    def resolve(self, component: Component | str) -> list[ParamSlice]:
        """The merged parameter slices a component owns (validated first)."""
        c = self.validate(component)
        if c.kind == "layer":
            slices = self._prefixed(self.spec.param_name(c.layer, ""))
        elif c.kind == "module":
            slices = self._resolve_module(c.layer, c.part)
        elif c.kind == "head":
            hd = {"stride": "head_dim", "size": "head_dim"}
            groups = [(self.spec.head.query, "head"), (self.spec.head.output, "head")]
            if self.include_kv:
                groups.append((self.spec.head.key_value, "kv_head"))
            slices = [
                s
                for rules, unit in groups
                for rule in rules
                for s in self._expand(rule, c.layer, c.index, {**hd, "unit": unit})
            ]
        elif c.kind == "neuron":
            nd = {"stride": 1, "size": 1, "unit": "neuron"}
            slices = [s for rule in self.spec.neuron for s in self._expand(rule, c.layer, c.index, nd)]
        elif c.kind == "expert":
            ed = {"stride": 1, "size": 1, "unit": "expert"}
            rules = self.spec.experts.expert if self.spec.experts else []
            slices = [s for rule in rules for s in self._expand(rule, c.layer, c.index, ed)]
        else:
            nd = {"stride": 1, "size": 1, "unit": "neuron"}
            rules = self.spec.experts.neuron if self.spec.experts else []
            slices = [
                ParamSlice(s.name, s.dim, s.ranges, c.expert)
                for rule in rules
                for s in self._expand(rule, c.layer, c.index, nd)
            ]
        return merge_slices(slices)

    def resolve_all(self, components: Iterable[Component | str]) -> list[ParamSlice]:
        """The union of the slices of several components."""
        return merge_slices(s for c in components for s in self.resolve(c))

    def check_kinds(self, kinds: Iterable[Kind]) -> None:
        """Refuse (:class:`ComponentError`) the mixture-of-experts granularities (``expert``,
        ``expert_neuron``) on a model without experts, instead of scoring nothing. (Other kinds are
        never empty in a dense model; in a model whose every MLP is experts, ``neuron`` of the
        default kinds is simply empty.)"""
        moe = [k for k in dict.fromkeys(kinds) if k in ("expert", "expert_neuron")]
        empty = [k for k in moe if next(self.components(kinds=(k,)), None) is None]
        if empty:
            raise ComponentError(
                f"this {self.spec.family} model has no {'/'.join(empty)} components (it is not a "
                f"mixture-of-experts model); drop {','.join(empty)} from --kinds"
            )

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
            if "expert" in kinds:
                for e in range(self.num_experts(layer)):
                    yield Component("expert", layer, "mlp", e)
            if "expert_neuron" in kinds:
                for e in range(self.num_experts(layer)):
                    for j in range(self.num_expert_neurons(layer)):
                        yield Component("expert_neuron", layer, f"mlp.expert{e}", j)

    def select(
        self, kinds: Iterable[Kind] = KINDS, components: Iterable[Component | str] | None = None
    ) -> list[Component]:
        """The named ``components`` (checked), or every component of ``kinds`` when none are named."""
        if components is not None:
            return [self.validate(c) for c in components]
        return list(self.components(kinds=tuple(kinds)))

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
                if piece.name.startswith(self.spec.param_name(layer, "")):
                    first = layer
                    break
        return first

    def acts_after_last_block(self, component: Component | str) -> bool:
        """Whether some of the component's weights act after the last decoder block (the final
        norm, the unembedding, or the input embedding when it is tied to the unembedding): an
        objective that reads the model's output reads them directly."""
        head = {
            s.name for m in self.spec.globals if m not in ("embed", "pos_embed") for s in self._resolve_module(None, m)
        }
        return any(piece.name in head for piece in self.resolve(component))

    def uncovered_parameters(self) -> list[str]:
        """Parameters that no model-level module and no per-layer module owns (a gap in the
        description; the layer components own everything under their prefix and do not count)."""
        owned = {s.name for m in self.spec.globals for s in self._resolve_module(None, m)}
        for layer in range(self.num_layers):
            owned |= {s.name for m in self.spec.modules for s in self._resolve_module(layer, m)}
        return sorted(set(self.shapes) - owned)

    # ---- model structure ---------------------------------------------------------------------
    def layer_path(self, layer: int) -> str:
        """The module path of decoder block ``layer``."""
        return self.spec.layer_path(layer)

    @property
    def layers_path(self) -> str:
        """The module path of the list of decoder blocks."""
        return self.spec.layers_path

    def module_path(self, layer: int, module: str) -> str:
        """The full submodule path of module name ``module`` in block ``layer`` (``L3.mlp`` ->
        ``model.layers.3.mlp``); ComponentError when the name is no single submodule."""
        if module not in self.spec.modules:
            raise ComponentError(f"no module {module!r} in layer {layer} of this {self.spec.family} model")
        sites = self.spec.sites
        sub = {"attn": sites.attn, "mlp": sites.mlp, "mlp.router": sites.router}.get(module) or self.spec.submodule(
            module
        )
        if sub is None:
            raise ComponentError(
                f"L{layer}.{module} is a slice of a fused parameter in the {self.spec.family} layout and has "
                f"no separate output to patch; use the heads or the whole 'attn'/'mlp' module"
            )
        return f"{self.layer_path(layer)}.{sub}"

    def checkpoint_layouts(self) -> dict[str, tuple[list[str], int, int]]:
        """Fused expert tensors of this model that checkpoints may store per expert:
        ``{fused name: (part name templates with {expert}, concat dim, number of experts)}``
        (for :class:`~weightpatch.weights.FusedExpertSource`)."""
        if self.spec.experts is None:
            return {}
        layouts = {}
        for layer in range(self.num_layers):
            for rel, fused in self.spec.experts.checkpoint_layout.items():
                name = self.spec.param_name(layer, rel)
                if name in self.shapes:
                    parts = [self.spec.param_name(layer, p) for p in fused.parts]
                    layouts[name] = (parts, fused.dim, self.shapes[name][0])
        return layouts

    def neuron_readout(self, layer: int) -> tuple[str, int]:
        """(down-projection weight name, neuron dim) of ``layer``: neuron ``j``'s output vector is
        the weight's slice ``j`` along that dim."""
        if not self.num_neurons(layer):
            raise ComponentError(f"layer {layer} of this {self.spec.family} model has no dense MLP neurons")
        rule = self.spec.neuron_readout()
        return self.spec.param_name(layer, rule.param), rule.dim

    def site(self, component: Component | str) -> Site:
        """The activation site of a component (the tensor a hook on that module sees):

        - ``L5``: output of block 5; ``embed``: input of block 0;
        - ``L5.attn`` / ``L5.mlp``: output of the declared attention / MLP module;
        - ``L5.<module>``: output of that submodule (when the module is exactly one submodule);
        - ``L5.attn.head2``: channels ``[2*head_dim, 3*head_dim)`` of the input of the head-output
          module (the per-head output before ``o_proj`` mixes the heads);
        - ``L5.mlp.neuron7``: channel 7 of the input of the neuron-activation module (down proj).

        Raises :class:`ComponentError` for components without one (model-level modules other than
        ``embed``, slices of fused parameters)."""
        c = self.validate(component)
        sites = self.spec.sites
        if c.kind == "layer":
            return Site(self.layer_path(c.in_layer), "post")
        if c.layer is None:
            if c.module == "embed":
                return Site(self.layer_path(0), "pre")
            raise ComponentError(f"{c.name} has no activation site; model-level modules other than 'embed' cannot be")
        block = self.layer_path(c.layer)
        if c.kind == "module":
            return Site(self.module_path(c.layer, c.part), "post")
        if c.kind == "head":
            hd = self.dims.head_dim
            return Site(f"{block}.{sites.head_output}", "pre", c.unit * hd, (c.unit + 1) * hd)
        if c.kind == "neuron" and sites.neuron_activation is not None:
            return Site(f"{block}.{sites.neuron_activation}", "pre", c.unit, c.unit + 1)
        if c.kind in ("expert", "expert_neuron"):
            raise ComponentError(
                f"{c.name} has no activation site: fused experts compute every expert inside one module; "
                f"patch the whole 'L{c.layer}.mlp' or the router 'L{c.layer}.mlp.router'"
            )
        raise ComponentError(f"{c.name}: components of kind {c.kind!r} have no activation site")

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
            names.append(f"L{c.layer}.attn.head0")
            if self.num_neurons(c.layer):
                names.append(f"L{c.layer}.mlp.neuron0")
            if self.num_experts(c.layer):
                names += [f"L{c.layer}.mlp.expert0", f"L{c.layer}.mlp.expert0.neuron0"]
        close = difflib.get_close_matches(c.name, names, n=1, cutoff=0.5)
        return close[0] if close else None

    def validate(self, component: Component | str) -> Component:
        """Return the component if it exists in this model, else raise a :class:`ComponentError`
        naming the closest valid name."""
        c = Component.parse(component) if isinstance(component, str) else component
        problem = None
        if c.layer is not None and not 0 <= c.layer < self.num_layers:
            problem = f"layer {c.layer} is out of range (the model has layers 0..{self.num_layers - 1})"
        elif c.kind == "head" and not 0 <= c.unit < self.num_heads:
            problem = f"head {c.index} is out of range (layer {c.layer} has heads 0..{self.num_heads - 1})"
        elif c.kind == "neuron" and not 0 <= c.unit < self.num_neurons(c.in_layer):
            problem = f"neuron {c.index} is out of range (layer {c.layer} has {self.num_neurons(c.in_layer)} neurons)"
        elif c.kind == "expert" and not 0 <= c.unit < self.num_experts(c.in_layer):
            problem = f"expert {c.index} is out of range (layer {c.layer} has {self.num_experts(c.in_layer)} experts)"
        elif c.kind == "expert_neuron" and not 0 <= c.expert < self.num_experts(c.in_layer):  # type: ignore[operator]
            problem = f"expert {c.expert} is out of range (layer {c.layer} has {self.num_experts(c.in_layer)} experts)"
        elif c.kind == "expert_neuron" and not 0 <= c.unit < self.num_expert_neurons(c.in_layer):
            n = self.num_expert_neurons(c.in_layer)
            problem = f"neuron {c.index} is out of range (the experts of layer {c.layer} have {n} neurons)"
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
