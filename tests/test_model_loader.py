"""The one model loader (``loading.load_model``): pairs, generation and merge evaluation load through it,
so revision, GGUF, adapters and the remote-code refusal hold everywhere (issue 29, item 5)."""

from __future__ import annotations

import pytest
import torch

from conftest import save, tiny_model, tiny_tokenizer
from gguf_writer import write_llama_gguf
from test_remote_code import remote_code_checkpoint
from weightpatch import demo, generation
from weightpatch.errors import WeightPatchError
from weightpatch.loading import load_model
from weightpatch.merging import evaluate as merge_evaluate
from weightpatch.pair import load_pair


def _same_weights(model, reference) -> None:
    expected = reference.state_dict()
    for name, param in model.named_parameters():
        assert torch.equal(param, expected[name]), name


def test_a_directory_loads_as_the_pair_receiver_frozen_or_trainable():
    path = demo.paths().specialized
    model, tokenizer = load_model(path)
    pair = load_pair(demo.paths().base, path, receiver="specialized")
    _same_weights(model, pair.model)
    assert tokenizer("the river").input_ids == pair.tokenizer("the river").input_ids
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    trainable, _ = generation.load_model(path)  # generation's loader keeps gradients (training, SNIP)
    _same_weights(trainable, model)
    assert not trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_a_gguf_file_loads_its_weights(tmp_path):
    base = tiny_model("llama")
    write_llama_gguf(base, tiny_tokenizer(), tmp_path / "base.gguf")
    for source, gguf_file in ((tmp_path / "base.gguf", None), (tmp_path, "base.gguf")):
        model, _ = load_model(source, gguf_file=gguf_file)
        _same_weights(model, base)


def test_remote_code_is_refused_unless_asked(tmp_path, monkeypatch):
    marker = tmp_path / "remote-code-ran"
    monkeypatch.setenv("WP_REMOTE_MARKER", str(marker))
    directory = remote_code_checkpoint(tmp_path / "remote", tiny_model("llama"))
    for load in (load_model, generation.load_model):
        with pytest.raises(WeightPatchError, match="cannot read a model config") as refused:
            load(directory)
        assert "trust_remote_code" in str(refused.value) and not marker.exists()


def test_merge_evaluation_loads_through_the_one_loader(tmp_path, monkeypatch):
    marker = tmp_path / "remote-code-ran"
    monkeypatch.setenv("WP_REMOTE_MARKER", str(marker))
    directory = remote_code_checkpoint(tmp_path / "remote", tiny_model("llama"))
    with pytest.raises(WeightPatchError, match="trust_remote_code"):
        merge_evaluate._load(directory, torch.float32, directory, {})
    assert not marker.exists()
    model = merge_evaluate._load(demo.paths().base, torch.float32, demo.paths().base, {"revision": "main"})
    _same_weights(model, load_model(demo.paths().base)[0])  # a revision is for hub ids: not passed here


def test_a_revision_for_a_local_directory_is_refused(tmp_path):
    directory = save(tiny_model("llama"), tmp_path / "m")
    with pytest.raises(WeightPatchError, match="--revision 'v1' picks a hub revision"):
        load_model(directory, revision="v1")


def test_an_adapter_is_applied_to_its_base(tmp_path):
    pytest.importorskip("peft")
    from test_lora import _build_adapter

    adapter, merged = _build_adapter(demo.paths().base, tmp_path, r=2, target_modules=["q_proj", "down_proj"])
    with pytest.raises(WeightPatchError, match="is a PEFT adapter: pass the base model"):
        load_model(adapter)
    model, tokenizer = load_model(adapter, base=demo.paths().base, dtype="float64")
    reference, _ = load_model(merged, dtype="float64")
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, reference.get_parameter(name), rtol=0, atol=1e-6, msg=name)
    assert tokenizer.pad_token_id is not None
