"""Streaming merge of Hugging Face checkpoints, one tensor at a time.

Inputs are directories holding safetensors weights (``model.safetensors`` or shards listed in
``model.safetensors.index.json``). Each tensor is read with ``safetensors.safe_open`` from the base
and every expert, merged, and buffered until the current output shard is full, so memory holds
one tensor per input model plus at most one output shard.

The output is written atomically: into a temporary directory beside the target, then renamed
into place. On any exception (including KeyboardInterrupt) the temporary directory is removed
and the target is left as it was (absent, or the old contents when ``overwrite=True``).
"""

from __future__ import annotations

import json
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

from weightpatch.errors import PairMismatchError, WeightPatchError
from weightpatch.weights import WEIGHT_FILE_SUFFIXES

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_SKIP_FILES = {"README.md", ".gitattributes", "weightpatch_merge.json"}

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
    """A read-only, lazy view of a safetensors checkpoint directory (sharded or not).

    Only headers are read up front; :meth:`get` opens the file, copies one tensor out and closes it,
    so input pages do not stay mapped (and resident) while the merge streams through."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise WeightPatchError(f"checkpoint directory {str(self.path)!r} does not exist")
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.path / SINGLE_NAME).is_file():
            weight_map = {}
        else:
            raise WeightPatchError(
                f"no safetensors weights in {str(self.path)!r} (expected {SINGLE_NAME} or {INDEX_NAME}); "
                f"re-save the model with save_pretrained(..., safe_serialization=True)"
            )
        self.file_of: dict[str, str] = {}
        files = list(dict.fromkeys(weight_map.values())) if weight_map else [SINGLE_NAME]
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for file in files:
            with safe_open(str(self.path / file), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                    sl = handle.get_slice(name)
                    self.file_of[name] = file
                    self.shapes[name] = tuple(sl.get_shape())
                    dt = sl.get_dtype()
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
        with safe_open(str(self.path / self.file_of[name]), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)


def open_checkpoint(source: str | os.PathLike[str], revision: str | None = None, base: Checkpoint | None = None):
    """A :class:`Checkpoint` for a directory or hub id (``revision``: branch, tag or commit),
    resolved as :func:`weightpatch.pair.load_pair` resolves models. With ``base``, a PEFT LoRA
    adapter (directory or hub id) is an expert ``base + adapter``
    (:class:`weightpatch.lora.LoraCheckpoint`, deltas computed from the factors tensor by tensor)."""
    from weightpatch.lora import LoraCheckpoint, is_adapter_dir
    from weightpatch.pair import resolve_checkpoint

    directory = resolve_checkpoint(source, revision)
    if base is not None and is_adapter_dir(directory):
        return LoraCheckpoint(directory, base)
    return Checkpoint(directory)


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
) -> Path:
    """Merge ``experts`` onto ``base`` with ``merger`` and write the result to ``output``.

    Floating-point tensors are merged (in float32) and saved in ``out_dtype`` (default: each
    tensor's base dtype); other tensors (integer buffers) are copied from the base. Non-weight
    files of the base (config.json, generation_config.json, tokenizer files, chat template) are
    copied; a ``weightpatch_merge.json`` records the inputs and ``description``. Returns the
    output path. Refuses to overwrite a non-empty directory unless ``overwrite=True``, and
    refuses any output overlapping an input directory.

    ``base`` and each expert may be a directory or a hub id (``base_revision``/``expert_revisions``
    pick a branch, tag or commit); an expert may be a PEFT LoRA adapter of ``base``.
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
    _check_target(target, [base_ckpt.path, *(e.path for e in expert_ckpts)], overwrite)
    max_bytes = parse_size(max_shard_size)

    check_compatible(base_ckpt, expert_ckpts)

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
    total_tensors = len(sizes)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        weight_map: dict[str, str] = {}
        done = 0
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            for name in shard:
                b = base_ckpt.get(name)
                if b.dtype.is_floating_point:
                    merged = merger.merge_tensor(name, b, [e.get(name) for e in expert_ckpts])
                else:
                    merged = b
                tensors[name] = merged.to(dtype_of(name)).contiguous()
                weight_map[name] = file
                done += 1
                if progress is not None:
                    progress(done, total_tensors, name)
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
        index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        copied = _copy_aux_files(base_ckpt.path, tmp)
        record = {
            "base": str(base_ckpt.path.absolute()),
            "experts": [str(e.path.absolute()) for e in expert_ckpts],
            "copied_from_base": copied,
            "merge": description if description is not None else _describe(merger),
        }
        (tmp / "weightpatch_merge.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _describe(merger: Any) -> Any:
    describe = getattr(merger, "describe", None)
    if callable(describe):
        return describe()
    return repr(merger)
