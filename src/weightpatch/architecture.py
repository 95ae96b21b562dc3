"""Architecture descriptions: how one model family's parameters and submodules map onto the
component vocabulary. This module is the only place that reads the description files; everything
else asks the validated :class:`ArchitectureSpec` (or :class:`~weightpatch.components.ComponentSpace`)
for paths, slices and activation sites.

Each family is a JSON file in ``weightpatch/architectures/`` (one per family, optionally
``"extends"`` another: dictionaries are merged one level deep, the child's entries win). Adding a
family is adding a file; see ``docs/adding-an-architecture.md``. The files are parsed into the
pydantic models below with ``extra="forbid"``, so a misspelt key is refused with the file and the
key, and every expression is checked against the dimension vocabulary when the file loads.

A description has:

- ``model_types``: the ``config.model_type`` values it covers.
- ``config``: where to read each dimension of :data:`DIMENSIONS` in the HF config (first key
  present wins). ``num_layers``, ``num_heads`` and ``hidden_size`` are required; ``num_kv_heads``
  falls back to ``num_heads`` and ``head_dim`` to ``hidden_size // num_heads``; a rule may use
  ``intermediate_size`` or ``num_experts`` only if ``config`` says where to read it.
- ``layer_prefix``: the parameter-name prefix of decoder block ``{layer}``, ``"<layers>.{layer}."``
  where ``<layers>`` is the path of the model's list of blocks.
- ``globals`` / ``modules``: module name -> list of rules. ``modules`` are per layer and their
  parameter names are relative to the layer prefix.
- ``head``: rules for the ``query`` and ``output`` slices of one attention head, and the
  ``key_value`` slices of its KV group (included only on request).
- ``neuron``: rules for the slices of one MLP neuron.
- ``sites``: the submodules (relative to a block) whose tensors are the activation sites, see
  :class:`Sites`.
- ``checkpoint_aliases`` (optional): older names a parameter may be stored under in checkpoint
  files (e.g. GPT-NeoX ``embed_out.weight`` for ``lm_head.weight``).

A rule is either a string (a parameter name, or a prefix ending in ``.`` meaning every parameter
under it), or a :class:`SliceRule` ``{"param", "dim", "offset", "size", "stride", "unit"}`` selecting
the index range ``[unit_index * stride + offset, ... + size)`` along ``dim``. ``offset``/``size``/
``stride`` are expressions: sums of products of integers and dimension names
(``"num_heads*head_dim + num_kv_heads*head_dim"``), so offsets inside fused tensors (Phi-3's
``qkv_proj`` and ``gate_up_proj``) are data. Defaults for head rules: ``stride = size = head_dim``;
for neuron rules: ``stride = size = 1``. Rules naming parameters absent from a model (e.g. biases)
are skipped, so one description serves variants with and without biases.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from weightpatch.errors import ArchitectureDescriptionError, UnknownArchitectureError

DIMENSIONS: tuple[str, ...] = (
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "hidden_size",
    "head_dim",
    "intermediate_size",
    "num_experts",
    "expert_intermediate_size",
)
"""The dimension vocabulary that rule expressions may name."""

_REQUIRED_DIMENSIONS = ("num_layers", "num_heads", "hidden_size")
_DERIVED_DIMENSIONS = ("num_kv_heads", "head_dim")  # have a fallback, need no config key
_TERM = re.compile(r"^(?:\d+|[a-z_]+)(?:\*(?:\d+|[a-z_]+))*$")


def _terms(expr: str) -> list[list[str]]:
    """``"2*a + b"`` -> ``[["2", "a"], ["b"]]`` (syntax checked; names not yet)."""
    text = expr.replace(" ", "")
    terms = text.split("+")
    if not text or not all(_TERM.match(t) for t in terms):
        raise ValueError(f"{expr!r} is not a sum of products of integers and dimension names (e.g. '2*hidden_size')")
    return [t.split("*") for t in terms]


def expression_names(expr: str | int) -> set[str]:
    """The dimension names an expression uses."""
    if isinstance(expr, int):
        return set()
    return {f for term in _terms(expr) for f in term if not f.isdigit()}


Expr = str | int


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SliceRule(_Strict):
    """A slice of one parameter: indices ``[u*stride + offset, u*stride + offset + size)`` along
    ``dim`` for unit index ``u``. ``unit`` says what ``u`` counts: ``head`` (default in
    ``head.query``/``head.output``), ``kv_head`` (default in ``head.key_value``: the KV group of
    the head), ``neuron`` (default in ``neuron``), ``all_heads`` (every head's slice, for fused
    per-head layouts such as GPT-NeoX), ``expert`` (default in ``experts.expert``) or None (one
    slice, ``u = 0``; default in ``modules``). ``size`` defaults to the whole extent of ``dim`` in
    module rules."""

    param: str = Field(min_length=1)
    dim: int = Field(ge=0)
    offset: Expr = 0
    size: Expr | None = None
    stride: Expr | None = None
    unit: Literal["head", "kv_head", "neuron", "expert", "all_heads"] | None = None

    @field_validator("offset", "size", "stride")
    @classmethod
    def _check_expression(cls, value: Expr | None) -> Expr | None:
        if isinstance(value, str):
            unknown = expression_names(value) - set(DIMENSIONS)
            if unknown:
                name = sorted(unknown)[0]
                close = difflib.get_close_matches(name, DIMENSIONS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"{name!r} is not a dimension; {hint}known dimensions: {', '.join(DIMENSIONS)}")
        return value

    def expressions(self) -> dict[str, Expr]:
        named = (("offset", self.offset), ("size", self.size), ("stride", self.stride))
        return {key: value for key, value in named if value is not None}


Rule = str | SliceRule


class ConfigKeys(_Strict):
    """Per dimension, the HF config attributes to read it from (first one present wins)."""

    num_layers: list[str]
    num_heads: list[str]
    hidden_size: list[str]
    num_kv_heads: list[str] = []
    head_dim: list[str] = []
    intermediate_size: list[str] = []
    num_experts: list[str] = []
    expert_intermediate_size: list[str] = []


class HeadRules(_Strict):
    """The slices of one attention head (see the module docstring)."""

    query: list[SliceRule] = []
    output: list[SliceRule] = []
    key_value: list[SliceRule] = []


class Sites(_Strict):
    """Activation sites, as submodule paths relative to a decoder block (what a hook on that
    module sees). The block output (``L5``) is the block's own output and ``embed`` the input of
    block 0; these need no declaration.

    - ``attn``: output of the attention block (``L5.attn``), before any post-attention norm and the
      residual add.
    - ``mlp``: output of the MLP block (``L5.mlp``), likewise.
    - ``head_output``: the module whose **input** holds the per-head outputs, head ``h`` in channels
      ``[h*head_dim, (h+1)*head_dim)`` (the attention output projection; ``L5.attn.head2``).
    - ``neuron_activation``: the module whose **input** holds the neuron activations, neuron ``j``
      in channel ``j`` (the MLP down projection; ``L5.mlp.neuron7``); required when the family
      has ``neuron`` rules.
    - ``router`` (mixture-of-experts only): the module whose output is the router logits.
    """

    attn: str
    mlp: str
    head_output: str
    neuron_activation: str | None = None
    router: str | None = None


class FusedParameter(_Strict):
    """How a checkpoint may store one fused per-expert tensor of the in-memory model: expert ``e``'s
    slab ``fused[e]`` is the concatenation along ``dim`` of the tensors ``parts`` (names relative
    to the layer prefix, ``{expert}`` standing for ``e``). transformers 5 fuses the experts of
    several mixture-of-experts families into 3-D tensors when loading checkpoints that store one
    tensor per expert (and splits them again when saving)."""

    parts: list[str] = Field(min_length=1)
    dim: int = Field(default=0, ge=0)

    @field_validator("parts")
    @classmethod
    def _check_parts(cls, value: list[str]) -> list[str]:
        for part in value:
            if "{expert}" not in part:
                raise ValueError(f"{part!r} must contain '{{expert}}' (where the expert index goes)")
        return value


class ExpertRules(_Strict):
    """Mixture-of-experts layers: the slices of one expert (``L3.mlp.expert5``; defaults ``unit =
    expert``, ``stride = size = 1``: experts are the leading dim of fused 3-D tensors), of one neuron
    inside an expert (``L3.mlp.expert5.neuron17``; like ``neuron`` rules, ``dim`` counting the
    fused tensor's dims, taken inside the expert's slab) and the per-expert checkpoint layout of
    the fused tensors (keys: parameter names relative to the layer prefix)."""

    expert: list[SliceRule] = Field(min_length=1)
    neuron: list[SliceRule] = []
    checkpoint_layout: dict[str, FusedParameter] = {}


class ArchitectureSpec(_Strict):
    """One family's description, with ``extends`` already merged in and every rule validated."""

    family: str
    model_types: list[str] = Field(min_length=1)
    description: str = ""
    config: ConfigKeys
    layer_prefix: str
    globals: dict[str, list[Rule]] = {}
    modules: dict[str, list[Rule]]
    head: HeadRules
    neuron: list[SliceRule] = []
    experts: ExpertRules | None = None
    sites: Sites
    checkpoint_aliases: dict[str, list[str]] = {}

    @field_validator("layer_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.]+\.\{layer\}\.", value):
            raise ValueError(f"{value!r} must look like 'model.layers.{{layer}}.' (blocks' path, '.{{layer}}.')")
        return value

    # ---- paths ---------------------------------------------------------------------------------
    @property
    def layers_path(self) -> str:
        """The module path of the list of decoder blocks (``model.layers``)."""
        return self.layer_prefix.removesuffix(".{layer}.")

    def layer_path(self, layer: int) -> str:
        """The module path of decoder block ``layer`` (``model.layers.5``)."""
        return f"{self.layers_path}.{layer}"

    def param_name(self, layer: int | None, relative: str) -> str:
        """A parameter (or prefix) name of block ``layer`` (None: model level)."""
        return relative if layer is None else self.layer_prefix.format(layer=layer) + relative

    def submodule(self, module: str) -> str | None:
        """The submodule path (relative to a block) that module name ``module`` is exactly, when its
        rules are one prefix rule (``"mlp.down"`` -> ``"mlp.down_proj"``); None for slices of fused
        parameters and for sets of submodules."""
        rules = self.modules.get(module, [])
        if len(rules) == 1 and isinstance(rules[0], str) and rules[0].endswith("."):
            return rules[0].removesuffix(".")
        return None

    def neuron_readout(self) -> SliceRule:
        """The neuron rule on the weight of the neuron-activation module (the down projection):
        neuron ``j``'s output vector is that weight's slice ``j`` along ``dim`` (checked at load)."""
        weight = f"{self.sites.neuron_activation}.weight"
        return next(r for r in self.neuron if r.param == weight)

    def tied_embedding(self) -> tuple[str, str] | None:
        """(embedding weight, unembedding weight) parameter names, the pair that
        ``tie_word_embeddings`` makes one tensor; None when the family lacks either."""
        names = []
        for module in ("embed", "unembed"):
            prefixes = [r for r in self.globals.get(module, []) if isinstance(r, str)]
            if not prefixes:
                return None
            names.append(prefixes[0] + "weight" if prefixes[0].endswith(".") else prefixes[0])
        return names[0], names[1]

    def tied_aliases(self, config: Any, names: set[str] | dict[str, Any]) -> dict[str, str]:
        """``{unembedding weight: embedding weight}`` when ``config`` ties the embeddings and
        ``names`` (a model's or checkpoint's parameter names) hold only the embedding; else ``{}``.
        The one rule for tied embeddings, used for models and checkpoints alike."""
        tied = self.tied_embedding()
        if tied is None or not getattr(config, "tie_word_embeddings", False):
            return {}
        embed, unembed = tied
        return {unembed: embed} if embed in names and unembed not in names else {}

    # ---- dimensions ----------------------------------------------------------------------------
    def dims(self, config: Any) -> ModelDims:
        """Read the model dimensions from a transformers config object."""

        def read(key: str) -> int | None:
            for name in getattr(self.config, key):
                value = getattr(config, name, None)
                if value is not None:
                    return int(value)
            return None

        num_layers, num_heads, hidden = read("num_layers"), read("num_heads"), read("hidden_size")
        if num_layers is None or num_heads is None or hidden is None:
            raise UnknownArchitectureError(
                f"the {self.family} description cannot read num_layers/num_heads/hidden_size from "
                f"this config ({type(config).__name__}); fix the 'config' keys in {self.family}.json"
            )
        num_kv = read("num_kv_heads") or num_heads
        head_dim = read("head_dim") or hidden // num_heads
        return ModelDims(
            num_layers,
            num_heads,
            num_kv,
            hidden,
            head_dim,
            read("intermediate_size"),
            read("num_experts"),
            read("expert_intermediate_size"),
        )

    def rules(self) -> list[tuple[str, Rule]]:
        """Every rule with its location in the file (``"neuron[2]"``, ``"modules.attn.q[0]"``)."""
        out: list[tuple[str, Rule]] = []
        for table, entries in (("globals", self.globals), ("modules", self.modules)):
            for module, rules in entries.items():
                out += [(f"{table}.{module}[{i}]", r) for i, r in enumerate(rules)]
        for group in ("query", "output", "key_value"):
            out += [(f"head.{group}[{i}]", r) for i, r in enumerate(getattr(self.head, group))]
        out += [(f"neuron[{i}]", r) for i, r in enumerate(self.neuron)]
        if self.experts is not None:
            out += [(f"experts.expert[{i}]", r) for i, r in enumerate(self.experts.expert)]
            out += [(f"experts.neuron[{i}]", r) for i, r in enumerate(self.experts.neuron)]
        return out


@dataclass(frozen=True)
class ModelDims:
    """The dimensions of one model that slice rules refer to (None: not in this config)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int
    head_dim: int
    intermediate_size: int | None = None
    num_experts: int | None = None
    expert_intermediate_size: int | None = None

    def eval(self, expr: Expr) -> int:
        """Evaluate a rule expression: an integer or a sum of products of integers and names."""
        if isinstance(expr, int):
            return expr
        total = 0
        for term in _terms(expr):
            value = 1
            for factor in term:
                if factor.isdigit():
                    value *= int(factor)
                    continue
                dim = getattr(self, factor)
                if dim is None:
                    raise UnknownArchitectureError(
                        f"the model config has no value for {factor!r}, which the architecture "
                        f"description uses; set it in config.json or fix the description's 'config' keys"
                    )
                value *= dim
            total += value
        return total


# ---- loading -----------------------------------------------------------------------------------
def _package_file(name: str) -> Path:
    return Path(str(resources.files("weightpatch.architectures") / f"{name}.json"))


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(parent.get(key), dict):
            merged[key] = {**parent[key], **value}
        else:
            merged[key] = value
    return merged


def _fail(path: Path, where: str, problem: str, fix: str) -> ArchitectureDescriptionError:
    return ArchitectureDescriptionError(f"{path.name}: {where}: {problem}; {fix}")


def _explain(path: Path, error: ValidationError) -> ArchitectureDescriptionError:
    errors = error.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # typos explain the rest
    # drop pydantic's union-branch markers from the location; list indices print as [i]
    loc = [p for p in first["loc"] if p not in ("str", "SliceRule", "int")]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).removeprefix(".") or "(top level)"
    if first["type"] == "extra_forbidden":
        key = str(loc[-1])
        fields = _known_keys([str(p) for p in loc[:-1] if not isinstance(p, int)])
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys here: {', '.join(fields)}"
        return _fail(path, where, f"unknown key {key!r}", f"remove it or fix the spelling ({hint})")
    if first["type"] == "missing":
        return _fail(path, where, "required key missing", "add it (see docs/adding-an-architecture.md)")
    return _fail(path, where, first["msg"].removeprefix("Value error, "), "fix the value")


def _known_keys(loc: list[str]) -> list[str]:
    """The field names allowed at a location (list indices dropped), for suggestions."""
    if not loc:
        return [*ArchitectureSpec.model_fields, "extends"]
    nested: dict[str, type[BaseModel]] = {
        "config": ConfigKeys,
        "sites": Sites,
        "head": HeadRules,
        "experts": ExpertRules,
    }
    model = nested.get(loc[0], SliceRule) if len(loc) == 1 and loc[0] != "neuron" else SliceRule
    if len(loc) == 3 and loc[:2] == ["experts", "checkpoint_layout"]:
        model = FusedParameter
    return list(model.model_fields)


def _check_dimensions(path: Path, spec: ArchitectureSpec) -> None:
    """Every dimension a rule names must be readable from the config (experts: ``num_experts``)."""
    if spec.experts is not None and not spec.config.num_experts:
        raise _fail(
            path,
            "experts",
            "mixture-of-experts rules need the number of experts, which 'config' does not say where to read",
            'add "num_experts": ["<config attribute>"] to "config" (e.g. ["num_experts"])',
        )
    for where, rule in spec.rules():
        if isinstance(rule, str):
            continue
        for key, expr in rule.expressions().items():
            for name in sorted(expression_names(expr)):
                if name in _REQUIRED_DIMENSIONS or name in _DERIVED_DIMENSIONS or getattr(spec.config, name):
                    continue
                raise _fail(
                    path,
                    f"{where}.{key}",
                    f"uses dimension {name!r}, which 'config' does not say where to read",
                    f'add "{name}": ["<config attribute>"] to "config" (e.g. ["{name}"])',
                )


def _check_sites(path: Path, spec: ArchitectureSpec) -> None:
    """The head and neuron sites must be the modules whose weights the head/neuron rules read out."""
    site = spec.sites.head_output
    if spec.head.output and not any(r.param.startswith(site + ".") for r in spec.head.output):
        raise _fail(
            path,
            "sites.head_output",
            f"{site!r} is not the module of any head.output rule",
            "set it to the attention output projection (the module whose weight head.output slices)",
        )
    if not spec.neuron:
        return
    weight = f"{spec.sites.neuron_activation}.weight"
    if spec.sites.neuron_activation is None or not any(r.param == weight for r in spec.neuron):
        raise _fail(
            path,
            "sites.neuron_activation",
            f"no neuron rule slices {weight!r}",
            "set it to the MLP down projection and give a neuron rule on its weight",
        )


def _resolve(path: Path) -> dict[str, Any]:
    """The raw description at ``path`` with its ``extends`` chain merged in (the parent is
    validated on its own first, so its errors name the parent's file)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArchitectureDescriptionError(f"{path.name}: cannot read the description ({exc}); fix the JSON") from exc
    if not isinstance(raw, dict):
        raise _fail(path, "(top level)", "the description is not a JSON object", "write one {...} object")
    parent_name = raw.pop("extends", None)
    if parent_name is None:
        return raw
    parent_path = path.with_name(f"{parent_name}.json")
    if not parent_path.exists():
        parent_path = _package_file(str(parent_name))
    if not parent_path.exists():
        raise _fail(path, "extends", f"no description {parent_name!r} to extend", "name a file in architectures/")
    parent = _resolve(parent_path)
    _validate(parent_path, parent)
    return _merge(parent, raw)


def _validate(path: Path, raw: dict[str, Any]) -> ArchitectureSpec:
    try:
        spec = ArchitectureSpec.model_validate(raw)
    except ValidationError as exc:
        raise _explain(path, exc) from None
    _check_dimensions(path, spec)
    _check_sites(path, spec)
    return spec


def load_architecture(path: str | Path) -> ArchitectureSpec:
    """Parse and validate one description file (``extends`` resolved next to it, then among the
    shipped files). Raises :class:`ArchitectureDescriptionError` naming the file, the key and a fix."""
    path = Path(path)
    return _validate(path, _resolve(path))


@cache
def available_architectures() -> dict[str, ArchitectureSpec]:
    """All shipped descriptions, keyed by ``model_type``."""
    specs: dict[str, ArchitectureSpec] = {}
    for entry in sorted(resources.files("weightpatch.architectures").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            spec = load_architecture(Path(str(entry)))
            for model_type in spec.model_types:
                specs[model_type] = spec
    return specs


def architecture_for(config: Any) -> ArchitectureSpec:
    """The description covering ``config.model_type``, or a clear error saying how to add one."""
    model_type = getattr(config, "model_type", None)
    specs = available_architectures()
    if model_type not in specs:
        raise UnknownArchitectureError(
            f"no architecture description for model_type {model_type!r} "
            f"(supported: {', '.join(sorted(specs))}). Add one: copy "
            f"weightpatch/architectures/llama.json to {model_type}.json, set model_types and the "
            f"parameter names of your family (see docs/adding-an-architecture.md)"
        )
    return specs[model_type]
