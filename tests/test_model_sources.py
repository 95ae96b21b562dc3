"""Model sources users pass: .gguf file paths, ``repo:file.gguf``, hub ids and local-looking paths."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_pair
from weightpatch.components import ParamSlice
from weightpatch.errors import WeightPatchError
from weightpatch.pair import load_pair, looks_local, resolve_checkpoint, split_model_source

pytest.importorskip("gguf")
from gguf_writer import write_llama_gguf


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as the hub client sees it (it reads the variable once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    dirs = make_pair("llama", root)
    files = [
        write_llama_gguf(
            AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d), root / f"{d.name}.gguf"
        )
        for d in dirs
    ]
    return dirs, files


def test_gguf_file_paths_load_like_the_safetensors_pair(gguf_pair):
    dirs, files = gguf_pair
    from_gguf, reference = load_pair(*files), load_pair(*dirs)
    assert from_gguf.specialized.gguf_file == files[1].name and from_gguf.specialized.path == str(files[1].parent)
    for name in reference.space.shapes:
        assert torch.equal(from_gguf.model.get_parameter(name), reference.model.get_parameter(name)), name
        assert torch.equal(from_gguf.donor.read(ParamSlice(name)), reference.donor.read(ParamSlice(name))), name


def test_split_model_source():
    assert split_model_source("org/model-GGUF:model.Q8_0.gguf") == ("org/model-GGUF", "model.Q8_0.gguf")
    assert split_model_source("org/model") == ("org/model", None)
    assert split_model_source("org/model", "w.gguf") == ("org/model", "w.gguf")
    with pytest.raises(WeightPatchError, match=r"^GGUF file 'models/missing.gguf' does not exist"):
        split_model_source("models/missing.gguf")


def test_gguf_file_path_splits_into_directory_and_name(gguf_pair):
    _, files = gguf_pair
    assert split_model_source(files[0]) == (str(files[0].parent), files[0].name)


def test_local_looking_missing_paths_fail_at_once(tmp_path, monkeypatch):
    """No hub lookup at all (no offline mode needed): the error comes before the hub client is asked."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    for source in ["in/nope", "./nope", "~/nope-weightpatch", "a/b/c", "..\\nope"]:
        assert looks_local(source), source
        start = time.monotonic()
        with pytest.raises(WeightPatchError, match=r"^model directory .* does not exist; pass a local directory"):
            resolve_checkpoint(source)
        assert time.monotonic() - start < 2
    assert not looks_local("some-org/some-model") and not looks_local("gpt2")


def test_existing_file_is_not_a_model_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(WeightPatchError, match="is a file, not a model directory"):
        resolve_checkpoint(f)


def test_merge_with_hub_shaped_names_offline_fails_fast_with_one_line(llama_pair_dirs, tmp_path, offline):
    from weightpatch.merging import MergeConfig, merge_checkpoints

    base, _ = llama_pair_dirs
    for experts, message in [
        (
            ["some-org/some-expert"],
            r"^'some-org/some-expert' is not a local directory and is not in the Hugging Face cache "
            r"\(HF_HUB_OFFLINE is set\)",
        ),
        ([tmp_path / "missing" / "expert"], r"^model directory .* does not exist"),
    ]:
        start = time.monotonic()
        with pytest.raises(WeightPatchError, match=message) as info:
            merge_checkpoints(base, experts, tmp_path / "out", MergeConfig())
        assert time.monotonic() - start < 2
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_hub_id_without_a_network_fails_at_once_without_retries(monkeypatch):
    """No HF_HUB_OFFLINE, no network: one look at the hub's host, then the cache, then one line (it
    was five retried requests, about a minute, before the error)."""
    import socket

    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    looks, asked, downloads = [], [], []

    def no_network(*args, **kwargs):
        looks.append(args[0] if args else kwargs.get("address"))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def no_request(*args, **kwargs):  # recorded: the code under test may swallow what it raises
        asked.append(args)
        raise AssertionError("the hub was asked although it cannot be reached")

    real_snapshot = huggingface_hub.snapshot_download

    def snapshot(*args, **kwargs):
        downloads.append(bool(kwargs.get("local_files_only")))
        return real_snapshot(*args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", no_request)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    start = time.monotonic()
    with pytest.raises(WeightPatchError) as info:
        resolve_checkpoint("some-org/some-model")
    assert time.monotonic() - start < 2
    # one look at the hub's host, then the cache only: no request the hub client would retry
    assert (len(looks), asked, downloads) == (1, [], [True])
    message = str(info.value)
    assert message.startswith("'some-org/some-model' is not a local directory and is not in the Hugging Face cache")
    assert "cannot be reached: Name or service not known" in message and "\n" not in message


def test_merge_reads_a_damaged_gguf_expert_as_one_line(llama_pair_dirs, tmp_path):
    from weightpatch.merging import MergeConfig, merge_checkpoints

    gguf = tmp_path / "expert.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(WeightPatchError, match=r"expert\.gguf") as info:
        merge_checkpoints(llama_pair_dirs[0], [gguf], tmp_path / "out", MergeConfig())
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_merge_takes_gguf_files_on_the_hub(gguf_pair, tmp_path, monkeypatch):
    """``repo-id:file.gguf`` in a merge goes through the pair loader's resolution (the hub download of
    that one file, here replaced by the local directory that holds it) and merges like the files."""
    import weightpatch.loading
    from weightpatch.merging import MergeConfig, merge_checkpoints

    _, files = gguf_pair
    asked = []

    def resolve(source, revision=None, gguf_file=None):
        asked.append((str(source), revision, gguf_file))
        return files[0].parent

    monkeypatch.setattr(weightpatch.loading, "resolve_checkpoint", resolve)
    hub = merge_checkpoints(
        f"org/base-GGUF:{files[0].name}", [f"org/sft-GGUF:{files[1].name}"], tmp_path / "hub", MergeConfig(),
        base_revision="v1",
    )  # fmt: skip
    assert asked == [("org/base-GGUF", "v1", files[0].name), ("org/sft-GGUF", None, files[1].name)]
    local = merge_checkpoints(files[0], [files[1]], tmp_path / "local", MergeConfig())
    hub_weights, local_weights = weights_of(hub), weights_of(local)
    assert sorted(hub_weights) == sorted(local_weights)
    assert all(torch.equal(hub_weights[k], local_weights[k]) for k in local_weights)


def weights_of(directory):
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}
