"""GGUF checkpoints (README: "GGUF (``gguf_file=``)"): a tiny Llama pair written as GGUF files the
way llama.cpp's converter writes them (Q/K rows permuted to its rotary layout, tokenizer in the
metadata) loads through transformers into the same weights, and patches like the safetensors pair."""

import pytest
import torch

from conftest import perturbed_copy, tiny_model, tiny_tokenizer, token_batch
from gguf_writer import write_llama_gguf
from weightpatch.pair import load_pair
from weightpatch.patch import patched

pytest.importorskip("gguf")


def test_gguf_pair_loads_the_same_weights_and_patches_to_the_specialized_model(tmp_path):
    base = tiny_model("llama")
    sft = perturbed_copy(base)
    write_llama_gguf(base, tiny_tokenizer(), tmp_path / "base.gguf")
    write_llama_gguf(sft, tiny_tokenizer(), tmp_path / "sft.gguf")
    pair = load_pair(tmp_path, tmp_path, base_gguf_file="base.gguf", specialized_gguf_file="sft.gguf")
    assert pair.space.spec.family == "llama"
    assert pair.base.gguf_file == "base.gguf" and pair.specialized.gguf_file == "sft.gguf"
    assert pair.base.weights_sha256 != pair.specialized.weights_sha256
    for name, p in base.named_parameters():  # Q/K un-permuted back exactly
        assert torch.equal(pair.model.get_parameter(name), p), name
    ids = token_batch()
    with torch.no_grad():
        sft_logits = sft(ids).logits
        with patched(pair.model, pair.donor, pair.space, pair.space.everything()):
            assert torch.equal(pair.model(ids).logits, sft_logits)
        with patched(pair.model, pair.donor, pair.space, ["L1.attn.head2"]):
            q = pair.model.get_parameter("model.layers.1.self_attn.q_proj.weight")
            assert torch.equal(q[16:24], sft.get_parameter("model.layers.1.self_attn.q_proj.weight")[16:24])
            assert torch.equal(q[:16], base.get_parameter("model.layers.1.self_attn.q_proj.weight")[:16])
