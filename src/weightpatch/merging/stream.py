"""Streaming merge of Hugging Face checkpoints, one tensor at a time.

Inputs are directories holding safetensors weights (``model.safetensors`` or shards listed in
``model.safetensors.index.json``), hub ids, or GGUF files (converted once to a temporary safetensors
copy, :func:`gguf_checkpoint`). Each tensor is read with ``safetensors.safe_open`` from the base
and every expert, merged, and buffered until the current output shard is full, so memory holds
one tensor per input model plus at most one output shard.

The output is written atomically: into a temporary directory beside the target, then renamed
into place, under a per-target lock (:mod:`weightpatch.merging.output`). An error removes the
temporary directory and leaves the target as it was (absent, or the old contents when
``overwrite=True``), and so does Ctrl-C; only a killed process (SIGKILL, power loss) leaves it, for
the next run to the same target, which resumes from its finished shards (same recipe) or removes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from weightpatch.errors import PairMismatchError, WeightPatchError, writing
from weightpatch.merging.checks import FiniteGuard, check_experts_against_base, refuse_custom_code
from weightpatch.merging.output import (
    CARD_NAME,
    RECIPE_FILE,
    apply_normal_modes,
    describe_vocabulary,
    model_card,
    read_recipe,
    remove_leftover,
    target_lock,
    temporary_outputs,
)
from weightpatch.weights import WEIGHT_FILE_SUFFIXES, SafetensorsFiles

logger = logging.getLogger("weightpatch")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
RECORD_NAME = "weightpatch_merge.json"
_SKIP_FILES = {"README.md", ".gitattributes", RECORD_NAME}

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorMerger(Protocol):
    """Anything that merges one tensor: :class:`~weightpatch.merging.methods.MergeConfig`,
    :class:`~weightpatch.merging.mechanism.MechanismMerge`."""

    def merge_tensor(self, name: str, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor: ...


class Checkpoint:
    """A read-only, lazy view of a safetensors checkpoint directory (sharded or not), for the merge:
    whole tensors and their torch dtypes over the one reader, :class:`weightpatch.weights.SafetensorsFiles`
    (headers up front; :meth:`get` opens the file, copies one tensor out and closes it, so input pages
    do not stay mapped, and resident, while the merge streams through)."""

    def __init__(self, path: str | os.PathLike[str], origin: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path)
        # what the weights were read from: this directory, or the GGUF file it was converted from
        self.origin = Path(origin) if origin is not None else self.path
        if not self.path.is_dir():
            raise WeightPatchError(f"checkpoint directory {str(self.path)!r} does not exist")
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as exc:
                raise WeightPatchError(
                    f"{index} is not a valid safetensors index ({type(exc).__name__}: {exc}); re-save the model"
                ) from None
        elif (self.path / SINGLE_NAME).is_file():
            weight_map = {}
        else:
            raise WeightPatchError(
                f"no safetensors weights in {str(self.path)!r} (expected {SINGLE_NAME} or {INDEX_NAME}); "
                f"re-save the model with save_pretrained(..., safe_serialization=True)"
            )
        self.files = SafetensorsFiles(
            self.path, list(dict.fromkeys(weight_map.values())) if weight_map else [SINGLE_NAME]
        )
        self.file_of = self.files.file_of
        self.shapes = self.files.shapes
        self.dtypes: dict[str, torch.dtype] = {}
        for name, dt in self.files.dtypes.items():
            if dt not in _DTYPES:
                raise WeightPatchError(f"tensor {name} in {self.path} has unsupported dtype {dt}")
            self.dtypes[name] = _DTYPES[dt]
        missing = sorted(set(weight_map) - set(self.file_of))
        if missing:
            raise WeightPatchError(f"{self.path / INDEX_NAME} lists tensors missing from the shards: {missing[:5]}")

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        return self.files.read(name)


def open_checkpoint(source: str | os.PathLike[str], revision: str | None = None, base: Checkpoint | None = None):
    """A :class:`Checkpoint` for a directory, a hub id (``revision``: branch, tag or commit), a
    ``.gguf`` file or ``repo-id:file.gguf``, resolved as :func:`weightpatch.pair.load_pair` resolves
    models (a GGUF model: :func:`gguf_checkpoint`). With ``base``, a PEFT LoRA adapter (directory or
    hub id) is an expert ``base + adapter`` (:class:`weightpatch.lora.LoraCheckpoint`, deltas
    computed from the factors tensor by tensor)."""
    from weightpatch.loading import refuse_unused_revision, resolve_checkpoint, split_model_source
    from weightpatch.lora import LoraCheckpoint, is_adapter_dir

    location, gguf_file = split_model_source(source)
    refuse_unused_revision(revision, [source], "--base-revision" if base is None else "--expert-revisions")
    directory = resolve_checkpoint(location, revision, gguf_file)
    if gguf_file:
        return gguf_checkpoint(directory, gguf_file)
    if base is not None and is_adapter_dir(directory):
        return LoraCheckpoint(directory, base)
    return Checkpoint(directory)


_CONVERTED: dict[tuple[str, int, int], Path] = {}  # GGUF file (path, size, mtime) -> its safetensors copy


def gguf_checkpoint(directory: Path, gguf_file: str) -> Checkpoint:
    """The GGUF model ``directory / gguf_file`` as a :class:`Checkpoint`: loaded by the pair's model
    loader (transformers dequantizes it, to float32 here) and saved with its config and tokenizer as
    safetensors into a temporary directory (removed when the process ends; one copy per file and
    process), which the merge then streams like any checkpoint. Its ``origin`` is the GGUF file,
    which the merge record names and hashes. Costs one model in memory while converting, and the
    float32 model's size on the temporary disk."""
    import atexit

    from weightpatch.pair import _load_model, _tokenizer

    origin = (directory / gguf_file).resolve()
    stat = origin.stat()
    key = (str(origin), stat.st_size, stat.st_mtime_ns)
    converted = _CONVERTED.get(key)
    if converted is None or not converted.is_dir():
        logger.info("reading %s (GGUF, dequantized to float32) into a temporary safetensors copy", origin)
        model = _load_model(directory, gguf_file, "float32", "cpu", None, None, False)
        tokenizer = _tokenizer(directory, gguf_file, False)
        converted = Path(tempfile.mkdtemp(prefix="weightpatch-gguf-"))
        atexit.register(shutil.rmtree, converted, ignore_errors=True)
        try:
            with writing(converted, "TMPDIR", "the temporary copy of a GGUF model"):
                _save_dequantized(model, converted)
                tokenizer.save_pretrained(converted)
        except BaseException:
            shutil.rmtree(converted, ignore_errors=True)
            raise
        del model
        _CONVERTED[key] = converted
    return Checkpoint(converted, origin=origin)


def _save_dequantized(model: Any, directory: Path) -> None:
    """``model`` (loaded from GGUF) as a plain safetensors checkpoint: its tensors (a tied one once,
    under its first name, as ``save_pretrained`` stores it), its config without the GGUF
    ``quantization_config`` (transformers refuses to save a GGUF-loaded model itself) and its
    generation config."""
    import copy

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(directory / SINGLE_NAME), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def check_compatible(base: Checkpoint, experts: Sequence[Checkpoint], limit: int = 5) -> None:
    """Raise :class:`PairMismatchError` unless every expert has exactly the base's tensor names
    and shapes, listing the first ``limit`` differences of each offending expert."""
    problems = []
    for expert in experts:
        diffs = []
        for name in base.names:
            if name not in expert.shapes:
                diffs.append(f"{name} missing")
            elif expert.shapes[name] != base.shapes[name]:
                diffs.append(f"{name} has shape {expert.shapes[name]} (base {base.shapes[name]})")
        diffs += [f"{n} not in the base" for n in expert.names if n not in base.shapes]
        if diffs:
            more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
            problems.append(f"{expert.path}: {'; '.join(diffs[:limit])}{more}")
    if problems:
        raise PairMismatchError(
            f"experts do not match the base {base.path} (same tensor names and shapes are required): "
            + " | ".join(problems)
        )


def parse_size(size: int | str) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"500MiB"`` -> 524_288_000, ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", size.upper())
    if not m:
        raise WeightPatchError(f"cannot parse shard size {size!r}; use e.g. '2GB', '500MB' or bytes")
    base = 1024 if m[3] == "IB" else 1000
    power = " KMGT".index(m[2] or " ")
    return int(float(m[1]) * base**power)


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    current = 0
    for name, nbytes in sizes:
        if shards[-1] and current + nbytes > max_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += nbytes
    return shards


def _check_target(target: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    for inp in inputs:
        inp = inp.resolve()
        if target == inp or inp in target.parents or target in inp.parents:
            raise WeightPatchError(
                f"output {str(target)!r} overlaps the input directory {str(inp)!r}; "
                f"choose an output path outside every input model"
            )
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise WeightPatchError(f"output {str(target)!r} exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise WeightPatchError(
                f"output directory {str(target)!r} exists and is not empty; pass overwrite=True "
                f"(--overwrite) to replace it or choose another path"
            )


def _publish(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    if not any(target.iterdir()):
        target.rmdir()
        os.replace(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _copy_aux_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in _SKIP_FILES:
            continue
        if f.name.endswith(WEIGHT_FILE_SUFFIXES) or f.name.endswith(".index.json"):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


def merge_checkpoints(
    base: str | os.PathLike[str],
    experts: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    merger: TensorMerger,
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    out_dtype: torch.dtype | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    description: dict[str, Any] | None = None,
    base_revision: str | None = None,
    expert_revisions: Sequence[str | None] | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Merge ``experts`` onto ``base`` with ``merger`` and write the result to ``output``.

    Floating-point tensors are merged (in float32) and saved in ``out_dtype`` (default: each
    tensor's base dtype); other tensors (integer buffers) are copied from the base. Non-weight
    files of the base (config.json, generation_config.json, tokenizer files, chat template) are
    copied; ``weightpatch_merge.json`` records the inputs (with the SHA-256 of their weights), the
    merge (``description``, default ``merger.describe()``) and the checks; ``README.md`` is a model
    card with the same facts. Returns the output path.

    Refused, before anything is written: a non-empty output unless ``overwrite=True``, an output
    overlapping an input, an expert that does not match the base (tensor names and shapes, model
    type, architecture, tokenizer vocabulary), a base with custom code unless
    ``trust_remote_code=True`` (then copied and flagged), and another merge writing to the same
    output. Non-finite values (in an input or the result) stop the merge with the first tensor
    names; nothing is published.

    Interruptions: an error or Ctrl-C (KeyboardInterrupt) removes the temporary output; a write
    error (disk full, read-only directory) is a one-line error naming the output. A killed process
    (SIGKILL) leaves it beside the target; the next run to the same target resumes from its finished
    shards when the recipe (inputs by content, merge settings, shard plan, library versions) is the
    same, and removes it otherwise. Output directories are 0755 and files 0644 (under the usual umask).

    ``base`` and each expert may be a directory, a hub id (``base_revision``/``expert_revisions``
    pick a branch, tag or commit), a ``.gguf`` file or ``repo-id:file.gguf`` (dequantized to float32
    through a temporary safetensors copy, :func:`gguf_checkpoint`); an expert may be a PEFT LoRA
    adapter of ``base``.
    """
    if not experts:
        raise WeightPatchError("merge_checkpoints needs at least one expert directory")
    target = Path(output).expanduser().absolute()
    target = target.parent.resolve() / target.name
    revisions = list(expert_revisions) if expert_revisions is not None else [None] * len(experts)
    if len(revisions) != len(experts):
        raise WeightPatchError(f"{len(revisions)} expert revisions for {len(experts)} experts; give one per expert")
    base_ckpt = open_checkpoint(base, base_revision)
    expert_ckpts = [open_checkpoint(e, r, base=base_ckpt) for e, r in zip(experts, revisions, strict=True)]
    _check_target(target, [_origin(base_ckpt), *(_origin(e) for e in expert_ckpts)], overwrite)
    max_bytes = parse_size(max_shard_size)

    check_compatible(base_ckpt, expert_ckpts)
    custom_code = refuse_custom_code(base_ckpt.path, trust_remote_code)
    vocabulary_checked = check_experts_against_base(
        base_ckpt.path,
        [e.path for e in expert_ckpts],
        bool(custom_code),
        labels=[_origin(base_ckpt), *(_origin(e) for e in expert_ckpts)],
    )

    def dtype_of(name: str) -> torch.dtype:
        dt = base_ckpt.dtypes[name]
        return out_dtype if out_dtype is not None and dt.is_floating_point else dt

    sizes = []
    for name in base_ckpt.names:
        numel = 1
        for s in base_ckpt.shapes[name]:
            numel *= s
        sizes.append((name, numel * dtype_of(name).itemsize))
    shards = _plan_shards(sizes, max_bytes)
    n_shards = len(shards)
    files = [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]
    merge_description = description if description is not None else _describe(merger)
    record = _merge_record(
        (base, _origin(base_ckpt)),
        [(e, _origin(c)) for e, c in zip(experts, expert_ckpts, strict=True)],
        merge_description,
        out_dtype,
        dict(zip(files, shards, strict=True)),
    )
    record["checks"] = {"vocabulary": describe_vocabulary(vocabulary_checked), "custom_code": "none"}
    if custom_code:
        record["checks"]["custom_code"] = f"copied with trust_remote_code: {', '.join(custom_code)}"
        logger.warning("the base has custom code (%s); copied into the merge as asked", ", ".join(custom_code))
    guard = FiniteGuard({"base": _origin(base_ckpt), **{f"expert {i}": _origin(e) for i, e in enumerate(expert_ckpts)}})

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightPatchError(f"cannot create {target.parent} ({exc.strerror}); choose a writable output") from None
    with target_lock(target):
        tmp = _resume_or_clean(target, record["recipe_sha256"])
        if tmp is None:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            (tmp / RECIPE_FILE).write_text(json.dumps({"recipe_sha256": record["recipe_sha256"]}) + "\n")
        output_errors = functools.partial(writing, target, "--output", "the merge output")  # disk full, read-only
        try:
            done = 0
            for file, shard in zip(files, shards, strict=True):
                if _finished_shard(tmp / file, shard):
                    done += len(shard)
                    if progress is not None:
                        progress(done, len(sizes), shard[-1])
                    continue
                tensors: dict[str, torch.Tensor] = {}
                for name in shard:
                    b = base_ckpt.get(name)
                    guard.check("base", name, b)
                    if b.dtype.is_floating_point:
                        inputs = [e.get(name) for e in expert_ckpts]
                        for i, t in enumerate(inputs):
                            guard.check(f"expert {i}", name, t)
                        if not guard.found:  # after the first non-finite tensor, only scan for more
                            merged = merger.merge_tensor(name, b, inputs).to(dtype_of(name)).contiguous()
                            if guard.check("merged", name, merged):
                                tensors[name] = merged
                        del inputs
                    elif not guard.found:
                        tensors[name] = b.to(dtype_of(name)).contiguous()
                    done += 1
                    if guard.full:
                        break
                    if progress is not None:
                        progress(done, len(sizes), name)
                if guard.full:
                    break
                if not guard.found:
                    partial = tmp / f"{file}.partial"
                    with output_errors():
                        save_file(tensors, str(partial), metadata={"format": "pt"})
                        os.replace(partial, tmp / file)
                del tensors
            guard.raise_if_any()
            weight_map = {name: file for file, shard in zip(files, shards, strict=True) for name in shard}
            index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
            with output_errors():
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
                record["copied_from_base"] = _copy_aux_files(base_ckpt.path, tmp)
                (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, default=str) + "\n")
                (tmp / CARD_NAME).write_text(model_card(json.loads(json.dumps(record, default=str))))
                (tmp / RECIPE_FILE).unlink()
                apply_normal_modes(tmp)
                _publish(tmp, target)
        except BaseException:  # an error, Ctrl-C: nothing is published, nothing is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _merge_record(
    base: tuple[str | os.PathLike[str], Path],
    experts: Sequence[tuple[str | os.PathLike[str], Path]],
    merge: Any,
    out_dtype: torch.dtype | None,
    plan: dict[str, list[str]],
) -> dict[str, Any]:
    """What ``weightpatch_merge.json`` records, and the recipe fingerprint: SHA-256 over the inputs'
    weight hashes, the merge description, the output dtype, the shard plan and the versions of
    weightpatch and torch (everything the bytes of the output depend on). ``base`` and ``experts``:
    ``(what the caller gave, the checkpoint directory or GGUF file)``."""
    import weightpatch
    from weightpatch.pair import weight_files, weights_sha256

    def ref(given: tuple[str | os.PathLike[str], Path]) -> dict[str, str]:
        source, directory = given
        files = weight_files(directory) if directory.is_dir() else [directory]
        return {"source": str(source), "path": str(directory.absolute()), "weights_sha256": weights_sha256(files)}

    record: dict[str, Any] = {
        "base": ref(base),
        "experts": [ref(e) for e in experts],
        "merge": merge,
        "out_dtype": str(out_dtype) if out_dtype is not None else None,
        "weightpatch_version": weightpatch.__version__,
    }
    fingerprint = {
        "inputs": [record["base"]["weights_sha256"], *(e["weights_sha256"] for e in record["experts"])],
        "merge": merge,
        "out_dtype": record["out_dtype"],
        "plan": plan,
        "versions": [weightpatch.__version__, torch.__version__],
    }
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    record["recipe_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return record


def _resume_or_clean(target: Path, recipe: str) -> Path | None:
    """With the target's lock held, every leftover temporary output is stale: adopt the newest one
    written for ``recipe`` (returned; its ``.partial`` files are dropped) and remove the others."""
    adopted = None
    for leftover in reversed(temporary_outputs(target)):  # newest first
        if adopted is None and leftover.name.startswith(f".{target.name}.tmp-") and read_recipe(leftover) == recipe:
            adopted = leftover
            for partial in leftover.glob("*.partial"):
                partial.unlink()
            kept = len(list(leftover.glob("*.safetensors")))
            logger.warning(
                "resuming an interrupted merge to %s from %s (%d shards already written)", target, leftover, kept
            )
        else:
            remove_leftover(leftover)
    return adopted


def _finished_shard(path: Path, names: list[str]) -> bool:
    """A shard a previous run finished (renamed into place only after it was written whole)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return set(handle.keys()) == set(names)
    except Exception:  # safetensors raises several types on a damaged file: rewrite it
        return False


def _origin(checkpoint: Any) -> Path:
    """What a checkpoint's weights were read from (a directory, or a GGUF file)."""
    return Path(getattr(checkpoint, "origin", checkpoint.path))


def _describe(merger: Any) -> Any:
    describe = getattr(merger, "describe", None)
    if callable(describe):
        return describe()
    return repr(merger)
