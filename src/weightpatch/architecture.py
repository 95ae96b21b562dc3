"""Architecture descriptions: how one model family's parameters map onto the component vocabulary.

Each family is a JSON file in ``weightpatch/architectures/`` (one per family, optionally
``"extends"`` another). Adding a family is adding a file; see ``docs/adding-an-architecture.md``.

A description has:

- ``model_types``: the ``config.model_type`` values it covers.
- ``config``: where to read ``num_layers``, ``num_heads``, ``num_kv_heads``, ``hidden_size`` and
  ``head_dim`` in the HF config (first key present wins; ``head_dim`` falls back to
  ``hidden_size // num_heads``).
- ``layer_prefix``: the parameter-name prefix of decoder block ``{layer}``.
- ``globals`` / ``modules``: module name -> list of rules. ``modules`` are per layer and their
  parameter names are relative to the layer prefix.
- ``head``: rules for the ``query`` and ``output`` slices of one attention head, and the
  ``key_value`` slices of its KV group (included only on request).
- ``neuron``: rules for the slices of one MLP neuron.
- ``checkpoint_aliases`` (optional): older names a parameter may be stored under in checkpoint
  files (e.g. GPT-NeoX ``embed_out.weight`` for ``lm_head.weight``).

A rule is either a string (a parameter name, or a prefix ending in ``.`` meaning every parameter
under it), or an object ``{"param", "dim", "offset", "size", "stride", "unit"}`` selecting the index
range ``[unit_index * stride + offset, ... + size)`` along ``dim``. ``offset``/``size``/``stride``
are expressions over the model dimensions (``"2*hidden_size"``). Defaults for head rules:
``stride = size = head_dim``; for neuron rules: ``stride = size = 1``. ``unit`` is ``"head"``
(the default in ``head.query``/``head.output``), ``"kv_head"`` (the default in
``head.key_value``), ``"neuron"``, or ``"all_heads"`` (a module made of every head's slice, for
fused per-head layouts such as GPT-NeoX). Rules naming parameters absent from a model (e.g. biases)
are skipped, so one description serves variants with and without biases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from weightpatch.errors import UnknownArchitectureError

Rule = str | dict[str, Any]


@dataclass(frozen=True)
class ModelDims:
    """The dimensions of one model that slice rules refer to."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int
    head_dim: int

    def eval(self, expr: str | int) -> int:
        """Evaluate a rule expression: an integer, a dimension name, or ``k*name``."""
        if isinstance(expr, int):
            return expr
        value = 1
        for factor in str(expr).replace(" ", "").split("*"):
            value *= int(factor) if factor.lstrip("-").isdigit() else int(getattr(self, factor))
        return value


@dataclass(frozen=True)
class ArchitectureSpec:
    """One family's description, with ``extends`` already merged in."""

    family: str
    model_types: tuple[str, ...]
    description: str
    config_keys: dict[str, list[str]]
    layer_prefix: str
    globals: dict[str, list[Rule]]
    modules: dict[str, list[Rule]]
    head: dict[str, list[Rule]]
    neuron: list[Rule] = field(default_factory=list)
    checkpoint_aliases: dict[str, list[str]] = field(default_factory=dict)

    def dims(self, config: Any) -> ModelDims:
        """Read the model dimensions from a transformers config object."""

        def read(key: str) -> int | None:
            for name in self.config_keys.get(key, []):
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
        return ModelDims(num_layers, num_heads, num_kv, hidden, head_dim)


def _load_raw(name: str) -> dict[str, Any]:
    path = resources.files("weightpatch.architectures") / f"{name}.json"
    return json.loads(path.read_text())


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(parent.get(key), dict):
            merged[key] = {**parent[key], **value}
        else:
            merged[key] = value
    return merged


def _resolve(name: str) -> dict[str, Any]:
    raw = _load_raw(name)
    if "extends" in raw:
        raw = _merge(_resolve(raw["extends"]), {k: v for k, v in raw.items() if k != "extends"})
    return raw


@cache
def available_architectures() -> dict[str, ArchitectureSpec]:
    """All shipped descriptions, keyed by ``model_type``."""
    specs: dict[str, ArchitectureSpec] = {}
    for entry in resources.files("weightpatch.architectures").iterdir():
        if not entry.name.endswith(".json"):
            continue
        raw = _resolve(entry.name.removesuffix(".json"))
        spec = ArchitectureSpec(
            family=raw["family"],
            model_types=tuple(raw["model_types"]),
            description=raw.get("description", ""),
            config_keys=raw["config"],
            layer_prefix=raw["layer_prefix"],
            globals=raw.get("globals", {}),
            modules=raw.get("modules", {}),
            head=raw.get("head", {}),
            neuron=raw.get("neuron", []),
            checkpoint_aliases=raw.get("checkpoint_aliases", {}),
        )
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
