"""GGUF checkpoints (README: "GGUF (``gguf_file=``)"): a tiny Llama pair written as GGUF files the
way llama.cpp's converter writes them (Q/K rows permuted to its rotary layout, tokenizer in the
metadata) loads through transformers into the same weights, and patches like the safetensors pair."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import VOCAB, perturbed_copy, tiny_model, token_batch
from weightpatch.pair import load_pair
from weightpatch.patch import patched

gguf = pytest.importorskip("gguf")

_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _to_gguf_rotary_layout(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of Q/K rows (per head: the two rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model: torch.nn.Module, path: Path) -> Path:
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(VOCAB - 3)])
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([2, 3, 3] + [1] * (VOCAB - 3))  # unknown, control, control, normal...
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, tensor in model.state_dict().items():
        value = tensor.detach().float().numpy()
        if name in _GLOBAL_TENSORS:
            writer.add_tensor(_GLOBAL_TENSORS[name], value)
            continue
        _, _, layer, *module, _ = name.split(".")
        module = ".".join(module)
        if module == "self_attn.q_proj":
            value = _to_gguf_rotary_layout(value, c.num_attention_heads)
        elif module == "self_attn.k_proj":
            value = _to_gguf_rotary_layout(value, c.num_key_value_heads)
        writer.add_tensor(f"blk.{layer}.{_LAYER_TENSORS[module]}.weight", np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_pair_loads_the_same_weights_and_patches_to_the_specialized_model(tmp_path):
    base = tiny_model("llama")
    sft = perturbed_copy(base)
    write_llama_gguf(base, tmp_path / "base.gguf")
    write_llama_gguf(sft, tmp_path / "sft.gguf")
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
