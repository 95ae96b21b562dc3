"""PEFT LoRA adapters as donors: the specialized model is ``base + delta`` with the delta computed
from the adapter's low-rank factors on the fly, one slice at a time, never as a merged model.

For a targeted ``nn.Linear`` weight ``W`` of shape ``(out, in)`` PEFT's ``get_delta_weight`` is

    delta W = scale * B @ A          (A: (r, in), B: (out, r))

with ``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (``use_rslora``); ``r`` and
``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` (a pattern matches a module name
that ends with it, as in PEFT's ``get_pattern_key``). A slice costs only its part of the product:
rows of ``W`` (a head's Q rows) are ``scale * B[rows] @ A``, columns (a head's O columns) are
``scale * B @ A[:, cols]``. With ``fan_in_fan_out`` (GPT-2's ``Conv1D``, weight ``(in, out)``) and
for embeddings (``lora_embedding_A: (r, vocab)``, ``lora_embedding_B: (dim, r)``, weight
``(vocab, dim)``) the delta is the transpose ``scale * (B @ A).T``. ``lora_bias`` adds
``scale * lora_B.bias`` to the bias. ``modules_to_save`` (and embedding ``base_layer`` weights that
PEFT saves with resized vocabularies) are stored whole in the adapter and replace the base's values.

Reading an adapter needs only ``safetensors`` and ``json``; ``peft`` itself is not imported. DoRA,
non-LoRA adapter types and LoRA variants that change the forward beyond ``W + delta W`` are refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from weightpatch.components import ParamSlice
from weightpatch.errors import PairMismatchError, WeightPatchError, reading
from weightpatch.weights import SafetensorsSource, WeightSource

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<param>weight|bias))?$"
)
#: Config keys of LoRA variants whose forward is not ``W + delta W`` (value set = refused).
_UNSUPPORTED_OPTIONS = (
    "use_dora",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
    "arrow_config",
    "monteclora_config",
    "kasa_config",
    "velora_config",
)


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (has ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern the module name ends with (after a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: ``param`` (canonical parameter name, e.g.
    ``model.layers.0.self_attn.q_proj.weight``) gets ``scale * B @ A`` (transposed when
    ``transposed``); ``a_key``/``b_key`` name the factors in the adapter file."""

    param: str
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float
    transposed: bool
    bias_key: str | None = None  # lora_B.bias with lora_bias=True


class _AdapterNumbers(BaseModel):
    """The numeric fields of ``adapter_config.json`` that set the delta, checked before use (a
    wrong type is the config's fault, refused naming the file and field)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    r: int = Field(8, ge=1)
    lora_alpha: float = 8.0
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    use_rslora: bool | None = None
    fan_in_fan_out: bool | None = None


@dataclass
class LoraAdapter:
    """A parsed PEFT LoRA adapter directory. Factors are read lazily from its safetensors file."""

    directory: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]  # by parameter name
    replaced: dict[str, str]  # parameter name -> adapter key of a full replacement tensor
    tensors: SafetensorsSource = field(repr=False)

    @classmethod
    def load(cls, directory: str | Path) -> LoraAdapter:
        """Parse ``adapter_config.json`` and the factor names; refuses what it cannot represent."""
        directory = Path(directory)
        with reading(directory / ADAPTER_CONFIG, "adapter config"):
            config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise WeightPatchError(f"{directory / ADAPTER_CONFIG}: expected a JSON object; re-save the adapter")
            _AdapterNumbers.model_validate(config)
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise WeightPatchError(
                f"{directory} is a PEFT {peft_type or 'unknown-type'} adapter; weightpatch reads LoRA adapters "
                f"only: merge it (model.merge_and_unload().save_pretrained(...)) and pass the merged directory"
            )
        for option in _UNSUPPORTED_OPTIONS:
            if config.get(option):
                what = "DoRA" if option == "use_dora" else f"{option}={config[option]!r}"
                raise WeightPatchError(
                    f"{directory}: LoRA adapters with {what} are not supported (their delta is not "
                    f"scale * B @ A); merge it with peft's merge_and_unload() and pass the merged directory"
                )
        if not (directory / ADAPTER_WEIGHTS).is_file():
            raise WeightPatchError(
                f"no {ADAPTER_WEIGHTS} in {directory}; re-save the adapter with "
                f"save_pretrained(..., safe_serialization=True)"
            )
        tensors = SafetensorsSource(directory)
        modules, replaced = _parse_keys(tensors, config, directory)
        return cls(directory, config, modules, replaced, tensors)

    @property
    def changed(self) -> list[str]:
        """Parameter names whose value differs from the base (adapted or replaced), sorted."""
        names = set(self.modules) | set(self.replaced)
        names |= {m.param.removesuffix(".weight") + ".bias" for m in self.modules.values() if m.bias_key}
        return sorted(names)

    def _bias_module(self, name: str) -> LoraModule | None:
        if not name.endswith(".bias"):
            return None
        module = self.modules.get(name.removesuffix(".bias") + ".weight")
        return module if module is not None and module.bias_key else None

    def delta(self, piece: ParamSlice) -> torch.Tensor | None:
        """``delta W`` restricted to ``piece`` (float32 or wider), or None when the adapter does not
        change that parameter by a low-rank delta. Only the needed rows/columns of the factors
        take part in the product."""
        module = self.modules.get(piece.name)
        if module is None:
            bias_of = self._bias_module(piece.name)
            if bias_of is None:
                return None
            bias = self.tensors.read(ParamSlice(bias_of.bias_key, piece.dim, piece.ranges))  # type: ignore[arg-type]
            return _wide(bias) * bias_of.scale
        a_key, b_key = module.a_key, module.b_key
        # Stored weight rows index B's rows (plain) or A's columns (transposed); columns the other way.
        out_dim, in_dim = (1, 0) if module.transposed else (0, 1)
        if piece.is_full:
            a, b = self.tensors.read(ParamSlice(a_key)), self.tensors.read(ParamSlice(b_key))
        elif piece.dim == out_dim:
            a, b = self.tensors.read(ParamSlice(a_key)), self.tensors.read(ParamSlice(b_key, 0, piece.ranges))
        elif piece.dim == in_dim:
            a, b = self.tensors.read(ParamSlice(a_key, 1, piece.ranges)), self.tensors.read(ParamSlice(b_key))
        else:
            raise WeightPatchError(f"slice of {piece.name} along dim {piece.dim}: a LoRA delta is 2-D")
        product = _wide(b) @ _wide(a)
        return (product.T if module.transposed else product) * module.scale

    def delta_norms(self) -> dict[str, float]:
        """Frobenius norm of every low-rank ``delta W`` (by parameter name), from the factors only:
        ``||s B A||_F = |s| sqrt(sum((B^T B) * (A A^T)))``, with r x r Gram matrices."""
        norms = {}
        for name, m in self.modules.items():
            a = _wide(self.tensors.read(ParamSlice(m.a_key))).double()
            b = _wide(self.tensors.read(ParamSlice(m.b_key))).double()
            squared = float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0))
            norms[name] = abs(m.scale) * math.sqrt(squared)
        return dict(sorted(norms.items()))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Half-precision factors in float32 (as PEFT merges on CPU); wider dtypes unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _parse_keys(
    tensors: SafetensorsSource, config: dict[str, Any], directory: Path
) -> tuple[dict[str, LoraModule], dict[str, str]]:
    r_default, alpha_default = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora, fan_in_fan_out = bool(config.get("use_rslora")), bool(config.get("fan_in_fan_out"))
    factors: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for key in tensors.names():
        name = key.removeprefix(_PREFIX)
        match = _FACTOR.match(name)
        if match is None:  # a whole tensor: modules_to_save copy or a saved embedding base layer
            param = name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
            param = param.replace(".original_module.", ".")
            replaced[param] = key
            continue
        kind = match["kind"] + (".bias" if match["param"] == "bias" else "")
        factors.setdefault(match["module"], {})[kind] = key
    modules = {}
    for module, keys in sorted(factors.items()):
        embedding = "lora_embedding_A" in keys
        a_key = keys.get("lora_embedding_A" if embedding else "lora_A")
        b_key = keys.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            raise WeightPatchError(f"{directory}: LoRA factors of {module} are incomplete (found {sorted(keys)})")
        shape_a = tensors.shape(a_key)
        if len(shape_a) != 2:
            raise WeightPatchError(
                f"{directory}: LoRA on {module} has {len(shape_a)}-D factors (a convolution); only linear and "
                f"embedding layers are supported; merge the adapter with merge_and_unload() instead"
            )
        rank = int(_pattern_value(rank_pattern, module, r_default))
        if shape_a[0] != rank:
            raise WeightPatchError(
                f"{directory}: {a_key} has rank {shape_a[0]} but adapter_config.json implies r={rank} for {module}"
            )
        alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        param = f"{module}.weight"
        modules[param] = LoraModule(
            param,
            a_key,
            b_key,
            rank,
            alpha,
            scale,
            transposed=embedding or fan_in_fan_out,
            bias_key=keys.get("lora_B.bias"),
        )
    return modules, replaced


class LoraSource:
    """The specialized model ``base + adapter`` as a lazy :class:`~weightpatch.weights.WeightSource`.

    ``read(piece)`` reads the base's slice from ``base`` (a lazy source over the base checkpoint,
    never the receiver being patched) and adds the adapter's delta for the same slice; parameters
    in ``modules_to_save`` are read from the adapter, all others from the base unchanged."""

    def __init__(self, adapter: LoraAdapter, base: WeightSource) -> None:
        self.adapter = adapter
        self.base = base

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.adapter.replaced:
            return self.adapter.tensors.shape(self.adapter.replaced[name])
        return self.base.shape(name)

    def read(self, piece: ParamSlice) -> torch.Tensor:
        if piece.name in self.adapter.replaced:
            own = self.adapter.tensors.read(ParamSlice(self.adapter.replaced[piece.name], piece.dim, piece.ranges))
            base = own
        else:
            base = self.base.read(piece)
        delta = self.adapter.delta(piece)
        if delta is None:
            return base
        if tuple(delta.shape) != tuple(base.shape):
            raise PairMismatchError(
                f"{self.adapter.directory}: the LoRA delta of {piece.name} has shape {tuple(delta.shape)} but the "
                f"base slice has {tuple(base.shape)}; the adapter was trained on another base model"
            )
        return base + delta.to(base.dtype)  # PEFT's merge: W + delta cast to W's dtype


def apply_adapter(model: torch.nn.Module, source: LoraSource) -> None:
    """Write ``base + delta`` into ``model`` (a loaded base) in place for every parameter the adapter
    changes: the specialized model as a receiver (knockout runs)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in source.adapter.changed:
            if name not in params:
                raise PairMismatchError(
                    f"{source.adapter.directory} adapts {name}, which the base model does not have; "
                    f"the adapter was trained on another base model"
                )
            param = params[name]
            param.copy_(source.read(ParamSlice(name)).to(param.dtype))


class LoraCheckpoint:
    """A LoRA expert for the streaming merge (:func:`weightpatch.merging.stream.merge_checkpoints`):
    the interface of :class:`~weightpatch.merging.stream.Checkpoint` (``path``, ``names``, ``shapes``,
    ``dtypes``, ``get``) over ``base + delta``, one tensor at a time. Checkpoint names are taken as
    the adapter's parameter names (PEFT names modules as the model does; Hugging Face checkpoints are
    saved under the same names)."""

    def __init__(self, directory: str | Path, base: Any) -> None:
        self.path = Path(directory)
        self.adapter = LoraAdapter.load(directory)
        self.base = base
        unknown = [n for n in self.adapter.changed if n not in base.shapes]
        if unknown:
            raise PairMismatchError(
                f"adapter {self.path} changes {unknown[:3]}, which the base {base.path} does not have; "
                f"the adapter was trained on another base model"
            )
        self.shapes = dict(base.shapes)  # a replaced tensor of another shape shows in check_compatible
        self.shapes.update({n: self.adapter.tensors.shape(k) for n, k in self.adapter.replaced.items()})
        self.dtypes = dict(base.dtypes)
        self._source = LoraSource(self.adapter, _CheckpointSource(base))

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        return self._source.read(ParamSlice(name))


class _CheckpointSource:
    """A merge :class:`Checkpoint` seen as a :class:`WeightSource` (full tensors only)."""

    def __init__(self, checkpoint: Any) -> None:
        self.checkpoint = checkpoint

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.checkpoint.shapes[name])

    def read(self, piece: ParamSlice) -> torch.Tensor:
        full = self.checkpoint.get(piece.name)
        if piece.is_full:
            return full
        index = piece.index()
        return full.index_select(piece.dim, index)  # type: ignore[arg-type]


@dataclass(frozen=True)
class AdapterSummary:
    """What ``wpatch check`` reports about an adapter: ranks, targets and delta norms."""

    directory: str
    rank: int  # the config's default r
    lora_alpha: float
    use_rslora: bool
    ranks: dict[str, int]  # per adapted parameter
    target_modules: list[str]  # as configured (names or a regex string)
    modules_to_save: list[str]
    delta_norms: dict[str, float]  # ||delta W||_F per adapted parameter
    layer_delta_norms: dict[int, float]  # sqrt of the summed squared norms per decoder layer (-1 = model level)

    def as_dict(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "rank": self.rank,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "ranks": dict(self.ranks),
            "target_modules": list(self.target_modules),
            "modules_to_save": list(self.modules_to_save),
            "delta_norms": dict(self.delta_norms),
            "layer_delta_norms": {str(k): v for k, v in self.layer_delta_norms.items()},
        }


def adapter_summary(adapter: LoraAdapter | str | Path, layer_of: Mapping[str, int] | None = None) -> AdapterSummary:
    """Rank, targets and per-parameter / per-layer ``||delta W||_F`` of an adapter, from the factors
    alone (no base weights read). ``layer_of`` maps parameter names to decoder-layer indices (e.g.
    ``{name: layer for name, (layer, _) in parameter_groups(space).items()}``); without it the layer
    is the first ``.<int>.`` in the name, -1 when there is none."""
    if not isinstance(adapter, LoraAdapter):
        adapter = LoraAdapter.load(adapter)
    norms = adapter.delta_norms()
    squared: dict[int, float] = {}
    for name, norm in norms.items():
        if layer_of is not None and name in layer_of:
            layer = layer_of[name]
        else:
            found = re.search(r"\.(\d+)\.", name)
            layer = int(found[1]) if found else -1
        squared[layer] = squared.get(layer, 0.0) + norm**2
    config = adapter.config
    targets = config.get("target_modules") or []
    return AdapterSummary(
        directory=str(adapter.directory),
        rank=int(config.get("r", 8)),
        lora_alpha=float(config.get("lora_alpha", 8)),
        use_rslora=bool(config.get("use_rslora")),
        ranks={n: m.rank for n, m in adapter.modules.items()},
        target_modules=[targets] if isinstance(targets, str) else sorted(targets),
        modules_to_save=sorted(config.get("modules_to_save") or []),
        delta_norms=norms,
        layer_delta_norms={k: math.sqrt(v) for k, v in sorted(squared.items())},
    )
