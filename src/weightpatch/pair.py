"""Loading a (base, specialized) model pair and checking that it is patchable (docs/method.md, "Pair").

One model is loaded as the **receiver** (normally the base; the specialized model for knockout
runs) and the other is the **donor**, read lazily tensor by tensor / slice by slice from its
safetensors files (see :mod:`weightpatch.weights`), so a pair costs about one model of memory.
Loading one model (and resolving hub ids, GGUF files and adapters) is :mod:`weightpatch.loading`'s.

Safety: no code from a checkpoint is executed. Safetensors are preferred; ``.bin`` checkpoints are
read by transformers with weights-only unpickling; ``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

from weightpatch.architecture import architecture_for
from weightpatch.components import ComponentSpace
from weightpatch.errors import PairMismatchError, WeightPatchError

# the loader's names stay importable from here, their home before the loader had its own module
from weightpatch.loading import (  # noqa: F401
    Role,
    _adapter_donor,
    _adapter_in,
    _config,
    _donor_source,
    _load_model,
    _tokenizer,
    _torch_dtype,
    check_device,
    hub_unreachable,
    load_model,
    looks_local,
    refuse_unused_revision,
    resolve_checkpoint,
    resolve_device,
    split_model_source,
    weight_files,
)
from weightpatch.lora import ADAPTER_CONFIG, is_adapter_dir
from weightpatch.weights import (
    WeightSource,
    shape_differences,
    weights_sha256,
)

_MAX_LISTED = 8


@dataclass(frozen=True)
class ModelRef:
    """Identity of one model of the pair, recorded next to every result."""

    source: str  # what the user gave: hub id or path
    path: str  # resolved local directory
    revision: str | None
    gguf_file: str | None
    weights_sha256: str  # over the weight files, in name order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _meta_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes a config implies, without allocating weights."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise WeightPatchError(
            f"{type(config).__name__} is not a causal language model (AutoModelForCausalLM does not "
            f"support it); weightpatch needs two causal LMs"
        ) from exc
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _vocab_differences(base_tok, sft_tok) -> list[str]:
    a, b = base_tok.get_vocab(), sft_tok.get_vocab()
    if a == b:
        return []
    problems = [f"tokenizer vocabulary: base has {len(a)} tokens vs specialized {len(b)}"]
    for token in sorted(set(a) ^ set(b))[:3]:
        where = "base" if token in a else "specialized"
        problems.append(f"tokenizer: token {token!r} only in {where}")
    for token in sorted(t for t in set(a) & set(b) if a[t] != b[t])[:3]:
        problems.append(f"tokenizer: token {token!r} has id {a[token]} in base vs {b[token]} in specialized")
    return problems


def pair_differences(base_config, sft_config, base_tok=None, sft_tok=None) -> list[str]:
    """Everything that makes two checkpoints unpatchable, most basic first."""
    problems = []
    if base_config.model_type != sft_config.model_type:
        problems.append(f"model_type: base {base_config.model_type!r} vs specialized {sft_config.model_type!r}")
    arch_a, arch_b = getattr(base_config, "architectures", None), getattr(sft_config, "architectures", None)
    if arch_a and arch_b and arch_a != arch_b:
        problems.append(f"architectures: base {arch_a} vs specialized {arch_b}")
    if not problems:
        shapes_a, shapes_b = _meta_shapes(base_config), _meta_shapes(sft_config)
        for name in sorted(set(shapes_a) | set(shapes_b)):
            if name not in shapes_b:
                problems.append(f"{name}: present in base, missing in specialized")
            elif name not in shapes_a:
                problems.append(f"{name}: missing in base, present in specialized")
            elif shapes_a[name] != shapes_b[name]:
                problems.append(f"{name}: base {shapes_a[name]} vs specialized {shapes_b[name]}")
    if base_tok is not None and sft_tok is not None:
        problems += _vocab_differences(base_tok, sft_tok)
    return problems


def list_problems(problems: list[str]) -> str:
    """The first differences of a pair check, ``; ``-joined, with the count of the rest."""
    listed = "; ".join(problems[:_MAX_LISTED])
    return listed + (f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else "")


def raise_if_mismatched(problems: list[str]) -> None:
    if problems:
        raise PairMismatchError(
            f"the two models cannot be patched into each other: {list_problems(problems)}. Weight Patching needs a "
            f"specialized model fine-tuned from this base (same architecture, parameter shapes and tokenizer)"
        )


@dataclass
class ModelPair:
    """A receiver model (weights in memory, eval mode, no grads) plus lazy donor weights.

    ``receiver`` says which of the two is in memory: ``"base"`` for repair runs (patch
    specialized weights into the base) and ``"specialized"`` for knockout runs.
    """

    model: PreTrainedModel
    tokenizer: Any
    donor: WeightSource
    space: ComponentSpace
    base: ModelRef
    specialized: ModelRef
    receiver: Role = "base"
    # what load_pair was given: dtype, device, device_map, trust_remote_code, revision (a stage given
    # this pair refuses a config that asks for other ones, so its run directory records what ran)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device, or with accelerate offload (parameters on
        ``meta`` between forwards) the execution device of the first offload hook."""
        for module in self.model.modules():
            hook = getattr(module, "_hf_hook", None)
            for h in getattr(hook, "hooks", [hook]):
                if getattr(h, "execution_device", None) is not None:
                    return torch.device(h.execution_device)
        return next(self.model.parameters()).device

    @contextmanager
    def as_model(self, role: Role, streamed: bool = False) -> Iterator[PreTrainedModel]:
        """The in-memory model with the weights of ``role``: the receiver as it is, or with every
        component patched from the donor (bit-identical to the other checkpoint).

        ``streamed``: for forwards without gradients, each block's (and model-level module's) donor
        weights are patched in only while it runs (:func:`weightpatch.patch.patched_while_running`):
        the same outputs bit for bit, with one block's weights added to memory instead of a second
        copy of the model; each forward reads the donor again (not for generation)."""
        if role not in ("base", "specialized"):
            raise WeightPatchError(f"unknown model role {role!r}; use 'base' or 'specialized'")
        if role == self.receiver:
            yield self.model
            return
        from weightpatch.patch import patched, patched_while_running

        if streamed:
            with patched_while_running(self.model, self.donor, self.space, self.space.everything()):
                yield self.model
            return
        with patched(self.model, self.donor, self.space, self.space.everything()):
            yield self.model

    def _facts(self) -> dict[str, Any]:
        space = self.space
        return {
            "family": space.spec.family,
            "layers": space.num_layers,
            "heads": space.num_heads,
            "receiver (in memory)": self.receiver,
            "base": self.base.source,
            "specialized": self.specialized.source,
            **{k: v for k, v in self.options.items() if v not in (None, False)},
        }

    def __repr__(self) -> str:
        from weightpatch.display import facts_text

        return f"ModelPair({facts_text(self._facts())})"

    def _repr_html_(self) -> str:
        from weightpatch.display import html_card

        return html_card("ModelPair", self._facts())

    def identities(self) -> dict[str, Any]:
        """What every run records: both models' identities and the library versions."""
        return {
            "base": self.base.to_dict(),
            "specialized": self.specialized.to_dict(),
            "receiver": self.receiver,
            "architecture": self.space.spec.family,
            "versions": library_versions(),
        }


def library_versions() -> dict[str, str]:
    import safetensors

    import weightpatch

    return {
        "weightpatch": weightpatch.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def load_pair(
    base: str | os.PathLike,
    specialized: str | os.PathLike,
    *,
    receiver: Role = "base",
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    base_gguf_file: str | None = None,
    specialized_gguf_file: str | None = None,
    include_kv: bool = False,
) -> ModelPair:
    """Load and check a pair. The receiver is loaded with ``from_pretrained``; the donor is read
    lazily from its safetensors files (loaded in full only for ``.bin``/GGUF checkpoints).

    Each model may be a directory, a hub id (``revision`` applies to both), a ``.gguf`` file path or
    ``repo-id:file.gguf``. The specialized model may also be a PEFT LoRA adapter directory (or hub
    id): it is ``base + adapter``, with the given base (the adapter's ``base_model_name_or_path`` is
    not used); its deltas are computed slice by slice from the factors (:mod:`weightpatch.lora`).

    ``device``: ``cpu``, ``cuda``, ``cuda:1``, ``mps`` or ``auto`` (the first of cuda, mps, cpu that
    is available). ``device_map`` (``"auto"`` or a module -> device dict, with ``max_memory`` per
    device) places the receiver across devices with accelerate, as ``from_pretrained`` does; the
    patch operator writes into dispatched and CPU-offloaded weights alike (disk offload is refused).

    Raises :class:`PairMismatchError` listing the first differences when the two are not patchable.
    """
    device = resolve_device(device)
    split = {
        "base": split_model_source(base, base_gguf_file),
        "specialized": split_model_source(specialized, specialized_gguf_file),
    }
    gguf = {r: split[r][1] for r in split}
    refuse_unused_revision(revision, [split[r][0] for r in split], "--revision")
    dirs = {r: resolve_checkpoint(split[r][0], revision, gguf[r]) for r in split}
    if not gguf["base"] and is_adapter_dir(dirs["base"]):
        raise WeightPatchError(
            f"{base} is a PEFT adapter, not a full model: pass the full base model first and the adapter as "
            f"the specialized model (for knockout runs use receiver='specialized')"
        )
    adapter = _adapter_in(dirs["specialized"], gguf["specialized"])
    sources = {"base": str(base), "specialized": str(specialized)}
    configs = {
        r: _config(dirs["base" if adapter and r == "specialized" else r], gguf[r], trust_remote_code) for r in dirs
    }
    architecture_for(configs["base"])  # unknown families fail before any weights are read
    tokenizers = {
        r: _tokenizer(dirs[r], gguf[r], trust_remote_code) for r in dirs if not (adapter and r == "specialized")
    }
    if adapter is not None:  # an adapter's own tokenizer files (if saved) must match the base's
        has_tokenizer = any((dirs["specialized"] / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizers["specialized"] = (
            _tokenizer(dirs["specialized"], None, trust_remote_code) if has_tokenizer else tokenizers["base"]
        )
    raise_if_mismatched(
        pair_differences(configs["base"], configs["specialized"], tokenizers["base"], tokenizers["specialized"])
    )
    donor_role: Role = "specialized" if receiver == "base" else "base"
    if adapter is None:
        model = _load_model(dirs[receiver], gguf[receiver], dtype, device, device_map, max_memory, trust_remote_code)
        space = ComponentSpace.from_model(model, include_kv=include_kv)
        donor = _donor_source(dirs[donor_role], gguf[donor_role], space, dtype, trust_remote_code)
    else:
        model = _load_model(dirs["base"], gguf["base"], dtype, device, device_map, max_memory, trust_remote_code)
        space = ComponentSpace.from_model(model, include_kv=include_kv)
        base_source = _donor_source(dirs["base"], gguf["base"], space, dtype, trust_remote_code)
        donor = _adapter_donor(adapter, model, space, base_source, receiver)
    raise_if_mismatched(shape_differences(space.shapes, donor, labels=(receiver, donor_role)))
    hashed = {r: weight_files(dirs[r], gguf[r]) for r in dirs}
    if adapter is not None:  # the scaling lives in the config: two alphas are two models
        hashed["specialized"].append(dirs["specialized"] / ADAPTER_CONFIG)
    refs = {r: ModelRef(sources[r], str(dirs[r]), revision, gguf[r], weights_sha256(hashed[r])) for r in dirs}
    options = {
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "device": str(device),
        "device_map": device_map,
        "max_memory": max_memory,
        "trust_remote_code": trust_remote_code,
        "revision": revision,
    }
    return ModelPair(model, tokenizers[receiver], donor, space, refs["base"], refs["specialized"], receiver, options)


def nonfinite_parameters(pair: ModelPair) -> dict[Role, list[tuple[str, int, int]]]:
    """Per model of the pair, its parameters holding NaN or inf as ``(name, n_nan, n_inf)``, in
    parameter order. The receiver is read in memory (parameters offloaded to ``meta`` are skipped),
    the donor one tensor at a time from its checkpoint."""
    from weightpatch.components import ParamSlice

    donor_role: Role = "specialized" if pair.receiver == "base" else "base"
    found: dict[Role, list[tuple[str, int, int]]] = {pair.receiver: [], donor_role: []}
    with torch.no_grad():
        for name, param in pair.model.named_parameters():
            for role, tensor in (
                (pair.receiver, None if param.is_meta else param),
                (donor_role, pair.donor.read(ParamSlice(name))),
            ):
                if tensor is None or not tensor.is_floating_point() or torch.isfinite(tensor).all():
                    continue
                found[role].append((name, int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())))
    return found


def check_finite(pair: ModelPair) -> None:
    """Refuse (:class:`WeightPatchError`, one line) a pair whose weights hold NaN or inf, naming
    the first parameters of each affected model. Every entry point that reads weights calls it."""
    problems = []
    for role, params in nonfinite_parameters(pair).items():
        if params:
            ref = pair.base if role == "base" else pair.specialized
            listed = ", ".join(f"{n} ({nan} NaN, {inf} inf)" for n, nan, inf in params[:3])
            more = f" and {len(params) - 3} more" if len(params) > 3 else ""
            problems.append(f"the {role} model ({ref.source}) has non-finite weights: {listed}{more}")
    if problems:
        raise WeightPatchError(
            "; ".join(problems) + "; re-export or re-download the checkpoint (or load it in float32 if it overflowed)"
        )
