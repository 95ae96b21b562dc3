"""Merge output hygiene: leftovers of killed runs, resume, lock, permissions, model card, custom
code, non-finite values and the pair check for every expert."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from merging_testutil import build_tiny_checkpoints, dir_hashes
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from weightpatch.errors import PairMismatchError, WeightPatchError
from weightpatch.merging import owner_takes_top, stream
from weightpatch.merging.mechanism import component_space_for_checkpoint
from weightpatch.merging.methods import MergeConfig
from weightpatch.merging.output import target_lock
from weightpatch.merging.stream import merge_checkpoints

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    return build_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture
def normal_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights_sha(directory: Path) -> str:
    """The combined weight hash computed independently: sha256 over ``name:sha256(bytes)`` per file."""
    h = hashlib.sha256()
    for f in sorted(p for p in directory.iterdir() if p.suffix == ".safetensors"):
        h.update(f"{f.name}:{_file_sha(f)}".encode())
    return h.hexdigest()


def test_modes_are_normal_even_from_private_inputs(tiny_checkpoints, tmp_path, normal_umask):
    base, a, _ = tiny_checkpoints
    private = _copy(base, tmp_path / "private_base")
    for f in private.iterdir():
        f.chmod(0o600)
    out = merge_checkpoints(private, [a], tmp_path / "out" / "merged", MergeConfig())
    assert (out.stat().st_mode & 0o777) == 0o755
    for f in out.iterdir():
        assert (f.stat().st_mode & 0o777) == 0o644, f.name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["merged"]  # no lock or temp left


def test_model_card_has_recipe_hashes_and_scores(tiny_checkpoints, tmp_path):
    base, a, b = tiny_checkpoints
    space = component_space_for_checkpoint(base)
    merger = owner_takes_top(
        space, [{"L1.mlp": 2.5, "L0.attn": 0.5}, {"L0.attn.head1": 4.0}], top_k=1, standard=MergeConfig(lam=0.5)
    )
    out = merge_checkpoints(base, [a, b], tmp_path / "merged", merger)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ")
    for directory in (base, a, b):
        assert _weights_sha(directory) in card
    assert "mechanism_variant: owner_takes_top" in card
    assert "lam: 0.5" in card
    assert "| L1.mlp | 2.5 | 1.0000 |" in card
    assert "| L0.attn.head1 | 4 | 1.0000 |" in card
    assert "L0.attn |" not in card  # not selected (top_k=1), so not used
    record = json.loads((out / "weightpatch_merge.json").read_text())
    assert record["experts"][1]["weights_sha256"] == _weights_sha(b)
    assert record["recipe_sha256"] in card
    assert record["merge"]["scores_used"][0] == [{"component": "L1.mlp", "score": 2.5, "normalized": 1.0}]
    plain = merge_checkpoints(base, [a], tmp_path / "plain", MergeConfig())
    assert "None: a standard merge uses no component scores." in (plain / "README.md").read_text()


def test_base_readme_is_replaced_by_the_card(tiny_checkpoints, tmp_path):
    base, a, _ = tiny_checkpoints
    with_card = _copy(base, tmp_path / "base")
    (with_card / "README.md").write_text("the base's own card\n")
    out = merge_checkpoints(with_card, [a], tmp_path / "merged", MergeConfig())
    assert "the base's own card" not in (out / "README.md").read_text()


def test_custom_code_is_refused_or_copied_and_flagged(tiny_checkpoints, tmp_path, caplog):
    base, a, _ = tiny_checkpoints
    custom = _copy(base, tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(WeightPatchError, match=r"custom code \(modeling_evil.py, config.json \(auto_map\)\)"):
        merge_checkpoints(custom, [a], tmp_path / "merged", MergeConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom"]
    out = merge_checkpoints(custom, [a], tmp_path / "merged", MergeConfig(), trust_remote_code=True)
    assert (out / "modeling_evil.py").read_text() == "raise SystemExit('ran')\n"
    assert "custom code in the base: copied with trust_remote_code: modeling_evil.py" in (out / "README.md").read_text()
    assert any("custom code" in r.message for r in caplog.records)


def test_non_finite_expert_is_refused_naming_tensors(tiny_checkpoints, tmp_path):
    base, a, b = tiny_checkpoints
    bad = _copy(a, tmp_path / "nan_expert")
    state = load_file(bad / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    state["model.norm.weight"][0] = float("inf")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightPatchError, match="non-finite") as err:
        merge_checkpoints(base, [b, bad], tmp_path / "merged", MergeConfig())
    msg = str(err.value)
    assert f"model.layers.1.mlp.up_proj.weight (expert 1 {bad})" in msg
    assert "model.norm.weight (expert 1" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan_expert"]


def test_overflowing_merge_is_refused(tiny_checkpoints, tmp_path):
    base, a, _ = tiny_checkpoints
    with pytest.raises(WeightPatchError, match=r"\(merged\).*overflow the output dtype"):
        merge_checkpoints(base, [a], tmp_path / "merged", MergeConfig(lam=1e7), out_dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []


def _permuted_tokenizer_pair(root: Path) -> tuple[Path, Path, Path]:
    """A base and two experts with tokenizers; the second expert's vocabulary swaps two ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import perturbed_copy, save, tiny_model, tiny_tokenizer

    base_model = tiny_model("llama")
    base = save(base_model, root / "base")
    good = save(perturbed_copy(base_model, seed=1), root / "good")
    vocab = tiny_tokenizer().get_vocab()
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    tok = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    permuted = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    bad = save(perturbed_copy(base_model, seed=2), root / "permuted", tokenizer=permuted)
    return base, good, bad


def test_vocabulary_permuted_expert_is_refused(tmp_path):
    base, good, bad = _permuted_tokenizer_pair(tmp_path)
    with pytest.raises(PairMismatchError, match=r"expert .*permuted cannot be merged.*token 'a' has id"):
        merge_checkpoints(base, [good, bad], tmp_path / "merged", MergeConfig())
    assert not (tmp_path / "merged").exists()
    out = merge_checkpoints(base, [good], tmp_path / "merged", MergeConfig())
    assert "tokenizer vocabulary equal to the base's: checked for every expert" in (out / "README.md").read_text()


def test_expert_of_another_architecture_is_refused(tmp_path):
    from conftest import save, tiny_model

    base = save(tiny_model("llama"), tmp_path / "base")
    other = tiny_model("llama")
    other.config.model_type = "mistral"
    other = save(other, tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PairMismatchError, match="model_type: base 'llama' vs specialized 'mistral'"):
        merge_checkpoints(base, [other], tmp_path / "merged", MergeConfig())


def test_stale_leftovers_are_removed(tiny_checkpoints, tmp_path, caplog):
    base, a, _ = tiny_checkpoints
    target = tmp_path / "merged"
    for leftover in (".merged.tmp-dead1234", ".merged.old-0badf00d"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model-00001-of-00001.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".other.tmp-keepme").mkdir()  # another target's temporary: not ours to touch
    merge_checkpoints(base, [a], target, MergeConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keepme", "merged"]
    assert sum("removed" in r.message and "did not finish" in r.message for r in caplog.records) == 2


def test_ctrl_c_removes_its_temporary_output_and_a_rerun_is_bit_equal(tiny_checkpoints, tmp_path, monkeypatch):
    base, a, b = tiny_checkpoints
    cfg = MergeConfig("ties", density=0.5)
    reference = merge_checkpoints(base, [a, b], tmp_path / "reference", cfg, max_shard_size="30KB")
    real_save = stream.save_file
    calls = []

    def interrupted_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # one shard is on disk in the temporary output
            raise KeyboardInterrupt("simulated Ctrl-C mid-write")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(stream, "save_file", interrupted_save)
    target = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoints(base, [a, b], target, cfg, max_shard_size="30KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference"]  # no .merged.tmp-*, no .merged.lock
    monkeypatch.setattr(stream, "save_file", real_save)
    merge_checkpoints(base, [a, b], target, cfg, max_shard_size="30KB")
    assert dir_hashes(target) == dir_hashes(reference)


def test_full_disk_is_a_one_line_error_and_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    base, a, _ = tiny_checkpoints

    def full_disk(tensors, path, metadata=None):  # what safetensors raises on ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(stream, "save_file", full_disk)
    target = tmp_path / "merged"
    with pytest.raises(WeightPatchError, match=r"cannot write in the merge output .*merged \(.*No space left") as err:
        merge_checkpoints(base, [a], target, MergeConfig())
    assert "free space or choose another --output" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_second_writer_is_refused(tiny_checkpoints, tmp_path):
    base, a, _ = tiny_checkpoints
    target = tmp_path / "merged"
    with (
        target_lock(target),
        pytest.raises(WeightPatchError, match=rf"another merge \(PID {os.getpid()}\) is writing"),
    ):
        merge_checkpoints(base, [a], target, MergeConfig())
    merge_checkpoints(base, [a], target, MergeConfig())
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


_KILLED_MERGE = """
import os, sys, time
from pathlib import Path
from weightpatch.merging.methods import MergeConfig
from weightpatch.merging.stream import merge_checkpoints

marker = Path(sys.argv[4])

def progress(done, total, name):
    if done == total - 3:  # some shards are on disk, the rest not yet
        marker.write_text(str(os.getpid()))
        time.sleep(600)

merge_checkpoints(sys.argv[1], [sys.argv[2]], sys.argv[3], MergeConfig("ties", density=0.5),
                  max_shard_size="30KB", progress=progress)
"""


def test_sigkill_mid_merge_then_rerun_is_bit_equal_and_leaves_nothing(tiny_checkpoints, tmp_path):
    base, a, _ = tiny_checkpoints
    work = tmp_path / "work"
    work.mkdir()
    target, marker = work / "merged", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_MERGE), str(base), str(a), str(target), str(marker)], env=env
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, "the merge subprocess exited before reaching the kill point"
            assert time.monotonic() < deadline, "the merge subprocess never reached the kill point"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    [leftover] = [p for p in work.iterdir() if p.name != ".merged.lock"]  # a dead process's lock is harmless
    assert leftover.name.startswith(".merged.tmp-")
    assert list(leftover.glob("*.safetensors"))  # the killed run had finished some shards

    cfg = MergeConfig("ties", density=0.5)
    merge_checkpoints(base, [a], target, cfg, max_shard_size="30KB")
    assert [p.name for p in work.iterdir()] == ["merged"]
    reference = merge_checkpoints(base, [a], tmp_path / "reference", cfg, max_shard_size="30KB")
    assert dir_hashes(target) == dir_hashes(reference)


def test_damaged_inputs_are_one_line_errors(tiny_checkpoints, tmp_path):
    base, a, b = tiny_checkpoints
    truncated = _copy(a, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    # the one reader's message (weights.SafetensorsFiles), as for a pair's donor: the file, then the fix
    with pytest.raises(
        WeightPatchError, match=r"truncated/model.safetensors: a safetensors file is truncated or corrupt .*re-download"
    ):
        merge_checkpoints(base, [truncated], tmp_path / "merged", MergeConfig())
    garbage = _copy(a, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(WeightPatchError, match="truncated or corrupt"):
        merge_checkpoints(base, [garbage], tmp_path / "merged", MergeConfig())
    bad_index = _copy(b, tmp_path / "bad_index")
    (bad_index / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(WeightPatchError, match="not a valid safetensors index"):
        merge_checkpoints(base, [bad_index], tmp_path / "merged", MergeConfig())
    assert not (tmp_path / "merged").exists()


def test_unwritable_output_location_is_a_one_line_error(tiny_checkpoints, tmp_path):
    base, a, _ = tiny_checkpoints
    (tmp_path / "a_file").write_text("not a directory")  # fails for root too, unlike a read-only directory
    with pytest.raises(WeightPatchError, match=r"cannot create .*a_file/sub \(Not a directory\); choose a writable"):
        merge_checkpoints(base, [a], tmp_path / "a_file" / "sub" / "merged", MergeConfig())
