import pytest
import transformers

from weightpatch.architecture import architecture_for, available_architectures
from weightpatch.errors import UnknownArchitectureError


def test_every_family_file_loads_and_extends_merge():
    specs = available_architectures()
    for model_type in ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neox"]:
        assert model_type in specs
    assert "attn.q_norm" in specs["qwen3"].modules and "mlp.gate" in specs["qwen3"].modules
    assert specs["gemma3_text"].modules["norm.pre_mlp"] == ["pre_feedforward_layernorm."]


def test_unknown_architecture_says_how_to_add_one():
    config = transformers.BertConfig()
    with pytest.raises(UnknownArchitectureError, match=r"no architecture description.*'bert'.*Add one"):
        architecture_for(config)
