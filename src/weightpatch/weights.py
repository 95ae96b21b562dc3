"""Donor weights read lazily: a :class:`WeightSource` gives one parameter, or one slice of it, at a
time, so patching never needs a second full model in memory.

- :class:`SafetensorsFiles`: the one lazy reader of safetensors files (headers up front; each read
  opens a file, copies one tensor or slice out with ``safe_open(...).get_slice`` and closes it). The
  donor's :class:`SafetensorsSource` (slices, name aliases) and the merge's
  :class:`~weightpatch.merging.stream.Checkpoint` (whole tensors, dtypes) are its two interfaces.
- :class:`SafetensorsSource`: a directory of (optionally sharded) ``.safetensors`` files, read with
  ``safe_open(...).get_slice`` (memory-mapped: only the requested rows/columns are materialized).
- :class:`TensorDictSource`: tensors already in memory (``.bin`` checkpoints, GGUF, tests).

Reading errors: :func:`reading_weights` turns a truncated or corrupt safetensors file and a pickle
that weights-only loading refuses into one-line :class:`WeightPatchError` messages; every reader of
checkpoint files (the receiver's ``from_pretrained``, the lazy donor, the merge's streamed reads)
runs inside it.

Identity: :func:`weights_sha256` is the SHA-256 of the weight files' bytes. A per-file cache keeps it
cheap for large checkpoints; a cached digest is reused only when the file's device, inode, size,
mtime and ctime (nanoseconds) and a hash of its first and last blocks all match, so a file rewritten
in place, even with its size and mtime restored, is hashed again (ctime cannot be set back).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from weightpatch.components import ParamSlice
from weightpatch.errors import PairMismatchError, WeightPatchError, reading

WEIGHT_FILE_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
"""File name endings of weight files (any framework): hashed as a model's identity, never copied
as auxiliary files by a merge."""

_BLOCK = 1 << 20  # bytes of the first and last block in a cache fingerprint
_ALWAYS_HASH_BELOW = 8 << 20  # smaller files are hashed every time (faster than the cache)


def reading_weights(location: str | os.PathLike) -> AbstractContextManager[None]:
    """Errors of reading checkpoint files under ``location`` (a file or directory) as one-line
    messages naming the file and the fix (:func:`weightpatch.errors.reading`)."""
    return reading(location, "checkpoint")


def _fingerprint(path: Path, stat: os.stat_result) -> str:
    """What must be unchanged for a cached digest of ``path`` to be reused."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(_BLOCK))
        if stat.st_size > _BLOCK:
            fh.seek(max(_BLOCK, stat.st_size - _BLOCK))
            h.update(fh.read(_BLOCK))
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{h.hexdigest()}"


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _cache_path() -> Path:
    root = Path(os.environ.get("WEIGHTPATCH_CACHE", Path.home() / ".cache" / "weightpatch"))
    return root / "file-hashes.json"


def file_sha256(path: str | os.PathLike, cache: dict[str, Any] | None = None) -> str:
    """SHA-256 of a file's bytes (hex). With ``cache`` (resolved path -> ``{"fingerprint",
    "sha256"}``), large files whose fingerprint (see the module docstring) is unchanged are not
    read again, and the cache is updated in place."""
    path = Path(path)
    stat = path.stat()
    if cache is None or stat.st_size < _ALWAYS_HASH_BELOW:
        return _hash_file(path)
    key = str(path.resolve())
    fingerprint = _fingerprint(path, stat)
    entry = cache.get(key)
    if not isinstance(entry, dict) or entry.get("fingerprint") != fingerprint:
        entry = {"fingerprint": fingerprint, "sha256": _hash_file(path)}
        # the file may have changed while it was read: cache only a digest of a file that did not
        if _fingerprint(path, path.stat()) == fingerprint:
            cache[key] = entry
    return entry["sha256"]


def files_sha256(files: Iterable[str | os.PathLike]) -> list[str]:
    """:func:`file_sha256` of each file, with the per-file cache kept in
    ``$WEIGHTPATCH_CACHE/file-hashes.json`` (default ``~/.cache/weightpatch``)."""
    from weightpatch.results import write_text_atomic

    cache_path = _cache_path()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    before = json.dumps(cache, sort_keys=True)
    digests = [file_sha256(f, cache) for f in files]
    if json.dumps(cache, sort_keys=True) != before:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cache_path, json.dumps(cache))
        except OSError:
            pass  # the cache is an optimization only
    return digests


def weights_sha256(files: Iterable[Path]) -> str:
    """SHA-256 over the weight files (each file's name and digest, in the given order)."""
    files = list(files)
    combined = hashlib.sha256()
    for f, digest in zip(files, files_sha256(files), strict=True):
        combined.update(f"{f.name}:{digest}".encode())
    return combined.hexdigest()


class WeightSource(Protocol):
    """Read access to one model's parameters by canonical (receiver) name."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, piece: ParamSlice) -> torch.Tensor:
        """The slice's values: the whole tensor, or the selected ranges along ``piece.dim``
        concatenated in order."""
        ...


def _select(full_or_slice, piece: ParamSlice) -> torch.Tensor:
    """Index ``piece.ranges`` along ``piece.dim`` (inside ``piece.expert``'s slab, if any) of a
    tensor or a safetensors slice object."""
    lead: tuple[slice, ...] = () if piece.expert is None else (slice(piece.expert, piece.expert + 1),)
    if piece.dim is None:
        return full_or_slice[lead]
    parts = []
    for a, b in piece.ranges:
        index = lead + (slice(None),) * (piece.dim - len(lead)) + (slice(a, b),)
        parts.append(full_or_slice[index])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=piece.dim)


class SafetensorsFiles:
    """The one lazy reader of a directory's safetensors ``files``: only the headers are read up front
    (``file_of``, ``shapes`` and safetensors ``dtypes`` names per tensor, in file order). Each read
    opens the file, copies the requested tensor or slice out and closes it again, so the pages do not
    stay mapped (and resident) across reads; a damaged file is a one-line error naming it
    (:func:`reading_weights`)."""

    def __init__(self, directory: str | Path, files: Iterable[str]) -> None:
        self.directory = Path(directory)
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for f in files:
            with self.opened(f) as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                    part = handle.get_slice(key)
                    self.file_of[key] = f
                    self.shapes[key] = tuple(part.get_shape())
                    self.dtypes[key] = part.get_dtype()

    @contextmanager
    def opened(self, file: str) -> Iterator[Any]:
        """``safe_open`` on one of the files (CPU), reading errors as one-line messages."""
        path = self.directory / file
        with reading_weights(path), safe_open(str(path), framework="pt", device="cpu") as handle:
            yield handle

    def read(self, name: str, piece: ParamSlice | None = None) -> torch.Tensor:
        """Tensor ``name`` as stored, whole or the slice ``piece`` of it."""
        with self.opened(self.file_of[name]) as handle:
            if piece is None or piece.is_full:
                return handle.get_tensor(name)
            return _select(handle.get_slice(name), piece).clone()


class SafetensorsSource:
    """Lazy donor reader over a checkpoint directory's safetensors files (:class:`SafetensorsFiles`).

    ``aliases`` maps a canonical receiver name to other names it may be stored under (tied
    embeddings; GPT-2 checkpoints saved without the ``transformer.`` prefix)."""

    def __init__(self, directory: str | Path, aliases: dict[str, list[str]] | None = None) -> None:
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise WeightPatchError(f"no .safetensors files in {self.directory}")
        self.files = SafetensorsFiles(self.directory, files)
        self.aliases = aliases or {}

    def names(self) -> list[str]:
        return list(self.files.file_of)

    def _key(self, name: str) -> str:
        candidates = [name, *self.aliases.get(name, [])]
        candidates += [c.split(".", 1)[1] for c in candidates if "." in c]
        for candidate in candidates:
            if candidate in self.files.file_of:
                return candidate
        raise PairMismatchError(f"parameter {name} is missing from the checkpoint in {self.directory}")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files.shapes[self._key(name)]

    def read(self, piece: ParamSlice) -> torch.Tensor:
        return self.files.read(self._key(piece.name), piece)


class TensorDictSource:
    """Weights already in memory (a state dict). Used for ``.bin`` and GGUF donors."""

    def __init__(self, tensors: dict[str, torch.Tensor], aliases: dict[str, list[str]] | None = None) -> None:
        self.tensors = tensors
        self.aliases = aliases or {}

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> TensorDictSource:
        return cls({n: p.detach() for n, p in model.named_parameters()})

    def _key(self, name: str) -> str:
        for candidate in [name, *self.aliases.get(name, [])]:
            if candidate in self.tensors:
                return candidate
        raise PairMismatchError(f"parameter {name} is missing from the donor weights")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[self._key(name)].shape)

    def read(self, piece: ParamSlice) -> torch.Tensor:
        tensor = self.tensors[self._key(piece.name)]
        return tensor if piece.is_full else _select(tensor, piece)


def shape_differences(
    receiver: dict[str, tuple[int, ...]],
    donor: WeightSource,
    labels: tuple[str, str] = ("base", "specialized"),
    names: Iterable[str] | None = None,
) -> list[str]:
    """Human-readable differences between the receiver's parameter shapes and the donor's
    (``labels`` name the receiver and the donor in the messages)."""
    problems = []
    for name in names or receiver:
        try:
            donor_shape = donor.shape(name)
        except PairMismatchError:
            problems.append(f"{name}: present in {labels[0]}, missing in {labels[1]}")
            continue
        if tuple(donor_shape) != tuple(receiver[name]):
            problems.append(f"{name}: {labels[0]} {tuple(receiver[name])} vs {labels[1]} {tuple(donor_shape)}")
    return problems


class FusedExpertSource:
    """A donor whose checkpoint stores one tensor per expert, read as the model's fused 3-D expert
    tensors (transformers 5 fuses e.g. Qwen3-MoE's ``experts.{e}.gate_proj/up_proj.weight`` into
    ``experts.gate_up_proj`` on load).

    ``layouts`` maps a fused parameter name to ``(part name templates with {expert}, concat dim,
    number of experts)`` (see :meth:`ComponentSpace.checkpoint_layouts`). Expert ``e`` of a fused
    tensor is its parts for ``e`` concatenated along the dim; a slice along dim 0 (experts) reads
    only the experts it selects, any other slice reads each expert's parts and selects from them,
    so no read materializes more than one fused tensor. Other names pass through to ``inner``."""

    def __init__(self, inner: WeightSource, layouts: dict[str, tuple[list[str], int, int]]) -> None:
        self.inner, self.layouts = inner, layouts

    def _expert(self, name: str, expert: int) -> torch.Tensor:
        parts, dim, _ = self.layouts[name]
        tensors = [self.inner.read(ParamSlice(p.format(expert=expert))) for p in parts]
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.layouts:
            return self.inner.shape(name)
        parts, dim, num_experts = self.layouts[name]
        shapes = [list(self.inner.shape(p.format(expert=0))) for p in parts]
        fused = shapes[0]
        fused[dim] = sum(s[dim] for s in shapes)
        return (num_experts, *fused)

    def read(self, piece: ParamSlice) -> torch.Tensor:
        if piece.name not in self.layouts:
            return self.inner.read(piece)
        num_experts = self.layouts[piece.name][2]
        if piece.expert is not None:  # inside one expert's slab: read that expert only
            slab = self._expert(piece.name, piece.expert)[None]
            return _select(slab, ParamSlice(piece.name, piece.dim, piece.ranges))
        if piece.dim == 0:
            experts = [e for a, b in piece.ranges for e in range(a, b)]
            return torch.stack([self._expert(piece.name, e) for e in experts])
        full = torch.stack([self._expert(piece.name, e) for e in range(num_experts)])
        return full if piece.is_full else _select(full, piece)
