"""Weight-file identity (content hashes whose cache cannot go stale) and one-line reading errors."""

import hashlib
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

import weightpatch.weights as weights
from conftest import make_pair
from weightpatch.errors import WeightPatchError
from weightpatch.pair import load_pair
from weightpatch.weights import SafetensorsSource, file_sha256, weights_sha256


@pytest.fixture
def cached(monkeypatch):
    """Use the cache for every file (normally only for files of 8 MiB and more) and count full reads."""
    monkeypatch.setattr(weights, "_ALWAYS_HASH_BELOW", 0)
    reads = []
    full = weights._hash_file
    monkeypatch.setattr(weights, "_hash_file", lambda path: reads.append(path) or full(path))
    return reads


def _rewrite_keeping_size_and_mtime(path, offset):
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


@pytest.mark.parametrize("where", ["first block", "middle", "last block"])
def test_weights_changed_in_place_with_size_and_mtime_kept_are_detected(tmp_path, cached, where):
    f = tmp_path / "model.safetensors"
    f.write_bytes(os.urandom(3 * weights._BLOCK + 123))
    first = weights_sha256([f])
    assert first == hashlib.sha256(f"{f.name}:{hashlib.sha256(f.read_bytes()).hexdigest()}".encode()).hexdigest()
    assert weights_sha256([f]) == first and len(cached) == 1  # unchanged: the cache answers
    offset = {"first block": 10, "middle": int(1.5 * weights._BLOCK), "last block": f.stat().st_size - 5}[where]
    _rewrite_keeping_size_and_mtime(f, offset)
    changed = weights_sha256([f])
    assert changed != first and len(cached) == 2
    assert changed == weights_sha256([f]) and len(cached) == 2


def test_cache_entries_follow_the_file_not_the_path(tmp_path, cached):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 5000)
    b.write_bytes(b"y" * 5000)
    cache: dict = {}
    digest_a = file_sha256(a, cache)
    os.replace(b, a)  # another file now at the same path, same size
    assert file_sha256(a, cache) == hashlib.sha256(b"y" * 5000).hexdigest() != digest_a


def test_small_files_are_hashed_every_time(tmp_path, monkeypatch):
    reads = []
    full = weights._hash_file
    monkeypatch.setattr(weights, "_hash_file", lambda path: reads.append(path) or full(path))
    f = tmp_path / "prompts.jsonl"
    f.write_text("abc")
    cache: dict = {}
    assert file_sha256(f, cache) == file_sha256(f, cache) == hashlib.sha256(b"abc").hexdigest()
    assert len(reads) == 2 and cache == {}


# ---- one-line reading errors -------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    return make_pair("llama", tmp_path_factory.mktemp("pair"))


@pytest.mark.parametrize("role", ["base", "specialized"])
@pytest.mark.parametrize("damage", ["truncated", "corrupt header"])
def test_damaged_safetensors_are_a_one_line_error(pair_dirs, tmp_path, role, damage):
    dirs = {"base": tmp_path / "base", "specialized": tmp_path / "specialized"}
    for r, source in zip(("base", "specialized"), pair_dirs, strict=True):
        shutil.copytree(source, dirs[r])
    f = dirs[role] / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:8] + b"\x00garbage" + data[16:])
    with pytest.raises(WeightPatchError, match=r"safetensors file is truncated or corrupt .*re-download") as err:
        load_pair(dirs["base"], dirs["specialized"])
    assert str(dirs[role]) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(WeightPatchError, match=r"model.safetensors: a safetensors file is truncated or corrupt"):
        SafetensorsSource(dirs[role])


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_a_pickle_that_weights_only_loading_refuses_says_why_and_how_to_convert(pair_dirs, tmp_path):
    base, specialized = pair_dirs
    bin_dir = tmp_path / "specialized-bin"
    shutil.copytree(specialized, bin_dir)
    state = load_file(str(bin_dir / "model.safetensors"))
    (bin_dir / "model.safetensors").unlink()
    torch.save({**state, "payload": _RunsCode()}, bin_dir / "pytorch_model.bin")
    with pytest.raises(WeightPatchError, match=r"weights-only loading refuses.*convert it once to safetensors") as err:
        load_pair(base, bin_dir)
    assert "\n" not in str(err.value) and isinstance(err.value.__cause__, pickle.UnpicklingError)
