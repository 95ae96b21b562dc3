"""Resolving and loading checkpoints: the one model loader (:func:`load_model`) and what
:func:`weightpatch.pair.load_pair` loads a pair with.

A model source is a local directory, a Hugging Face hub id (at a ``revision``), a ``.gguf`` file or
``repo-id:file.gguf`` (:func:`split_model_source`, :func:`resolve_checkpoint`); a PEFT LoRA adapter
is applied to its base. The config is read first (:func:`_config`), so a checkpoint that needs its
own code is refused in one line unless ``trust_remote_code``; the one ``from_pretrained`` of a
model is :func:`_load_model`. Donor weights are opened lazily (:func:`_donor_source`).

Safety: no code from a checkpoint is executed. Safetensors are preferred; ``.bin`` checkpoints are
read by transformers with weights-only unpickling; ``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from weightpatch.architecture import architecture_for
from weightpatch.components import ComponentSpace
from weightpatch.errors import PairMismatchError, WeightPatchError, reading
from weightpatch.lora import LoraAdapter, LoraSource, apply_adapter, is_adapter_dir
from weightpatch.weights import (
    WEIGHT_FILE_SUFFIXES,
    FusedExpertSource,
    SafetensorsSource,
    TensorDictSource,
    WeightSource,
    reading_weights,
)

Role = Literal["base", "specialized"]


def looks_local(source: str) -> bool:
    """Whether ``source`` can only be meant as a local path (so a missing one is reported at once,
    never looked up on the hub): it starts with ``.``, ``/`` or ``~``, has a backslash or more than
    one ``/`` (a hub id is ``name`` or ``owner/name``), or its parent directory exists here
    (``in/nope`` next to an existing ``in/``)."""
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1:
        return True
    parent = Path(source).parent
    return parent != Path(".") and parent.is_dir()


def split_model_source(source: str | os.PathLike, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(directory or hub id, GGUF file name)`` for what a user passes as a model: a directory or
    hub id as it is; a path to a ``.gguf`` file as (its directory, its name); ``repo-id:file.gguf``
    as (``repo-id``, ``file.gguf``). An explicit ``gguf_file`` wins over one implied by the path."""
    text = str(source)
    path = Path(text).expanduser()
    if text.endswith(".gguf") and path.is_file():
        return str(path.parent), gguf_file or path.name
    if text.endswith(".gguf") and ":" in text and not looks_local(text.rsplit(":", 1)[0]):
        repo, _, name = text.rpartition(":")
        return repo, gguf_file or name
    if text.endswith(".gguf"):
        raise WeightPatchError(
            f"GGUF file {text!r} does not exist; pass an existing .gguf file, or repo-id:file.gguf for the hub"
        )
    return text, gguf_file


def refuse_unused_revision(revision: str | None, sources: Sequence[str | os.PathLike], option: str) -> None:
    """Refuse a hub ``revision`` (given as ``option``) when every one of ``sources`` is a local path:
    it would be silently ignored (a local directory is used as it is)."""
    if revision is None or not sources or not all(Path(s).expanduser().exists() for s in sources):
        return
    listed = ", ".join(str(s) for s in sources)
    verb = "is a local path" if len(sources) == 1 else "are local paths"
    raise WeightPatchError(f"{option} {revision!r} picks a hub revision, but {listed} {verb}; drop {option}")


def check_device(device: str | torch.device) -> None:
    """Refuse a torch device this machine does not have (``cuda`` without CUDA, ``cuda:3`` with
    two GPUs, ``mps`` off Apple silicon) before any model is loaded."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise WeightPatchError(f"unknown device {device!r} ({exc}); use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise WeightPatchError(f"device {device!r} is not available ({why}); use --device auto or cpu")
        if dev.index is not None and dev.index >= count:
            raise WeightPatchError(f"device {device!r} does not exist (GPUs 0..{count - 1}); pick one of those")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise WeightPatchError(f"device {device!r} is not available on this machine; use --device cpu")


def resolve_checkpoint(source: str | os.PathLike, revision: str | None = None, gguf_file: str | None = None) -> Path:
    """A local directory for ``source``: the directory itself, or a hub snapshot (downloaded or
    from the local cache: configs, tokenizer files, and the weights: safetensors, else ``.bin``, or
    the one GGUF file asked for). Raises a clear error when neither exists; a source that looks
    like a local path (:func:`looks_local`) is reported missing without asking the hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.is_file():
        hint = " (a .gguf file is accepted as it is)" if not text.endswith(".gguf") else ""
        raise WeightPatchError(f"{text!r} is a file, not a model directory; pass the directory that holds it{hint}")
    if looks_local(text):
        raise WeightPatchError(f"model directory {text!r} does not exist; pass a local directory or a hub id")
    from huggingface_hub import list_repo_files, snapshot_download

    offline = hub_unreachable()
    if offline is not None:  # the cache or nothing: never a retried request
        try:
            return Path(snapshot_download(text, revision=revision, local_files_only=True))
        except Exception as exc:
            raise WeightPatchError(
                f"{text!r} is not a local directory and is not in the Hugging Face cache ({offline}); check the "
                f"id, or download it where the hub is reachable and pass the directory"
            ) from exc
    patterns = ["*.json", "*.model", "*.txt", "*.jinja"]
    if gguf_file:
        patterns.append(gguf_file)
    else:
        try:  # PyTorch .bin weights only for repositories without safetensors
            has_safetensors = any(f.endswith(".safetensors") for f in list_repo_files(text, revision=revision))
        except Exception:  # the hub failed: rely on what the local cache has
            has_safetensors = True
        patterns += ["*.safetensors"] if has_safetensors else ["pytorch_model*.bin"]
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises many types; all mean "cannot get it"
        raise WeightPatchError(
            f"{text!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}); check the id, or download it and pass the directory"
        ) from exc


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be asked (``HF_HUB_OFFLINE`` set, or its host not reachable: one DNS
    look-up and one connection attempt of at most ``timeout`` seconds), or None when it can. Checked
    before any hub request, so an offline machine fails at once instead of after the hub client's
    retries."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"the hub at {host} cannot be reached: {getattr(exc, 'strerror', None) or exc}"
    return None


def weight_files(directory: Path, gguf_file: str | None = None) -> list[Path]:
    if gguf_file:
        return [directory / gguf_file]
    return sorted(p for p in directory.iterdir() if p.name.endswith(WEIGHT_FILE_SUFFIXES) and p.is_file())


def _what(gguf_file: str | None, what: str) -> str:
    """How a reading error names what was read: the GGUF file, or ``what``."""
    return "GGUF file" if gguf_file else what


def _config(directory: Path, gguf_file: str | None, trust_remote_code: bool):
    try:
        source = directory / gguf_file if gguf_file else directory / "config.json"
        with reading(source, _what(gguf_file, "model config"), also=(OSError, ValueError) if gguf_file else ()):
            return AutoConfig.from_pretrained(directory, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise WeightPatchError(f"cannot read a model config in {directory}: {exc}") from exc


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float64": torch.float64,
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise WeightPatchError(f"unknown dtype {dtype!r}; use one of float64, float32, bfloat16, float16, auto")
    return names[dtype]


def load_model(
    source: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    gguf_file: str | None = None,
    base: str | os.PathLike | None = None,
    base_gguf_file: str | None = None,
    frozen: bool = True,
) -> tuple[PreTrainedModel, Any]:
    """One model and its tokenizer, loaded as :func:`load_pair` loads its receiver: the one loader of
    pairs, generation and merge evaluation.

    ``source`` is a directory, a hub id (at ``revision``), a ``.gguf`` file path or
    ``repo-id:file.gguf`` (or a directory with ``gguf_file=``). Its config is read first, so a
    checkpoint that needs its own code is refused in one line unless ``trust_remote_code``. A PEFT
    LoRA adapter directory is applied to ``base`` (the model it was trained on; required, at the
    same ``revision``). The model is in eval mode on ``device`` (or placed by ``device_map``); with
    ``frozen`` its parameters need no gradients (``frozen=False`` for training or gradient scores).
    """
    device = resolve_device(device)
    path, gguf = split_model_source(source, gguf_file)
    base_split = split_model_source(base, base_gguf_file) if base is not None else None
    refuse_unused_revision(revision, [path] + ([base_split[0]] if base_split else []), "--revision")
    directory = resolve_checkpoint(path, revision, gguf)
    adapter = _adapter_in(directory, gguf)
    options = (dtype, device, device_map, max_memory, trust_remote_code)
    if adapter is None:
        _config(directory, gguf, trust_remote_code)  # the remote-code refusal, before any weights
        tokenizer = _tokenizer(directory, gguf, trust_remote_code)
        model = _load_model(directory, gguf, *options)
    else:
        if base_split is None:
            raise WeightPatchError(f"{source} is a PEFT adapter: pass the base model it was trained on (base=)")
        base_dir = resolve_checkpoint(base_split[0], revision, base_split[1])
        architecture_for(_config(base_dir, base_split[1], trust_remote_code))
        has_tokenizer = any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = _tokenizer(
            directory if has_tokenizer else base_dir, None if has_tokenizer else base_split[1], trust_remote_code
        )
        model = _load_model(base_dir, base_split[1], *options)
        space = ComponentSpace.from_model(model)
        _adapter_donor(
            adapter,
            model,
            space,
            _donor_source(base_dir, base_split[1], space, dtype, trust_remote_code),
            "specialized",
        )
    model.requires_grad_(not frozen)
    return model, tokenizer


def _adapter_donor(
    adapter: LoraAdapter, model: PreTrainedModel, space: ComponentSpace, base_source: WeightSource, receiver: Role
) -> WeightSource:
    """The donor of an adapter pair. ``model`` is the loaded base: for a knockout run (``receiver =
    "specialized"``) the adapter is applied to it in place and the base checkpoint is the donor;
    otherwise the donor is ``base + adapter``, read lazily (:class:`~weightpatch.lora.LoraSource`)."""
    unknown = [n for n in adapter.changed if n not in space.shapes and n not in space.aliases]
    if unknown:
        raise PairMismatchError(
            f"the adapter in {adapter.directory} changes {unknown[:3]}, which the base model does not "
            f"have; pass the base model the adapter was trained on"
        )
    adapted = LoraSource(adapter, base_source)
    if receiver == "specialized":
        apply_adapter(model, adapted)
        return base_source
    return adapted


def _adapter_in(directory: Path, gguf_file: str | None) -> LoraAdapter | None:
    """The PEFT adapter in ``directory``, or None for a full checkpoint."""
    if gguf_file or not is_adapter_dir(directory):
        return None
    return LoraAdapter.load(directory)


def _tokenizer(directory: Path, gguf_file: str | None, trust_remote_code: bool):
    try:
        with reading(directory / gguf_file if gguf_file else directory, _what(gguf_file, "tokenizer")):
            return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise WeightPatchError(f"cannot load a tokenizer from {directory}: {exc}") from exc


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device for ``device``; ``"auto"`` is cuda when available, else mps, else cpu. A device
    that is not available here is refused in one line (:func:`check_device`)."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    check_device(device)
    return torch.device(device)


def _load_model(
    directory: Path, gguf_file, dtype, device, device_map, max_memory, trust_remote_code
) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = dict(max_memory)  # transformers rewrites it in place
    if not gguf_file and not weight_files(directory):
        raise WeightPatchError(f"no weight files (.safetensors/.bin/.gguf) in {directory}")
    try:
        with reading_weights(directory / gguf_file if gguf_file else directory):
            model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise WeightPatchError(f"{directory} is not a causal language model ({exc})") from exc
        raise
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _donor_source(directory: Path, gguf_file, space: ComponentSpace, dtype, trust_remote_code) -> WeightSource:
    aliases: dict[str, list[str]] = {k: list(v) for k, v in space.spec.checkpoint_aliases.items()}
    for alias, canonical in space.aliases.items():
        aliases.setdefault(canonical, []).append(alias)
    if not gguf_file and any(directory.glob("*.safetensors")):
        source = SafetensorsSource(directory, aliases)
        stored = set(source.names())
        layouts = {name: layout for name, layout in space.checkpoint_layouts().items() if name not in stored}
        return FusedExpertSource(source, layouts) if layouts else source
    donor_model = _load_model(directory, gguf_file, dtype, "cpu", None, None, trust_remote_code)
    return TensorDictSource.from_model(donor_model)
