"""Tiny model pairs for every supported family, built from configs in seconds.

``make_pair(family, tmp_path)`` saves a base model and a "specialized" model whose every parameter
differs from the base (base + noise) as Hugging Face directories with a word-level tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 64


def _config(config_class, **defaults):
    """A config factory: ``factory(**overrides)`` builds ``config_class`` from the defaults with
    ``overrides`` applied at construction (so derived fields such as ``layer_types`` follow)."""
    return lambda **overrides: config_class(**{**defaults, **overrides})


TINY_CONFIGS = {
    "llama": _config(
        transformers.LlamaConfig,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "mistral": _config(
        transformers.MistralConfig,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        max_position_embeddings=64,
    ),
    "qwen2": _config(
        transformers.Qwen2Config,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "qwen3": _config(
        transformers.Qwen3Config,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        head_dim=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "gemma": _config(
        transformers.GemmaConfig,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        head_dim=8,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
    ),
    "gemma2": _config(
        transformers.Gemma2Config,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        head_dim=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        max_position_embeddings=64,
    ),
    "gemma3": _config(
        transformers.Gemma3TextConfig,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        head_dim=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        max_position_embeddings=64,
        sliding_window_pattern=2,
    ),
    "phi3": _config(
        transformers.Phi3Config,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "olmo2": _config(
        transformers.Olmo2Config,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gpt2": _config(transformers.GPT2Config, vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "gpt_neox": _config(
        transformers.GPTNeoXConfig,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
    ),
}
FAMILIES = sorted(TINY_CONFIGS)


def tiny_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE over single characters (no merges), so that every family's own tokenizer
    class (transformers 5 rebuilds e.g. Qwen2's from vocab and merges) tokenizes it the same way."""
    chars = ["\u0120", *"abcdefghijklmnopqrstuvwxyz0123456789"]  # \u0120 is byte-level space
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_config(family: str, num_layers: int | None = None, **overrides) -> transformers.PretrainedConfig:
    """The tiny config of ``family`` (``overrides`` passed to its factory), with ``num_layers`` decoder
    blocks instead of 3 if given (rebuilt from its dict so that per-layer attention types follow the
    new depth)."""
    config = TINY_CONFIGS[family](**overrides)
    if num_layers is None:
        return config
    values = config.to_dict()
    values.pop("layer_types", None)
    values["n_layer" if family == "gpt2" else "num_hidden_layers"] = num_layers
    return type(config)(**values)


def tiny_model(family: str, seed: int = 0, num_layers: int | None = None, **overrides) -> torch.nn.Module:
    config = tiny_config(family, num_layers, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init of norms is constant 1: make every parameter informative
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def perturbed_copy(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """A "specialized" model: every parameter of ``model`` plus Gaussian noise."""
    other = AutoModelForCausalLM.from_config(model.config)
    other.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return other.eval()


def save(model: torch.nn.Module, directory: Path, tokenizer=None) -> Path:
    model.save_pretrained(directory)
    (tokenizer or tiny_tokenizer(model.config.vocab_size)).save_pretrained(directory)
    return directory


def make_pair(
    family: str, root: Path, scale: float = 0.05, num_layers: int | None = None, **overrides
) -> tuple[Path, Path]:
    """Base and specialized directories under ``root``; ``overrides`` change the tiny config
    (e.g. ``num_hidden_layers=4``)."""
    base = tiny_model(family, num_layers=num_layers, **overrides)
    sft = perturbed_copy(base, scale)
    return save(base, root / f"{family}-base"), save(sft, root / f"{family}-sft")


def tree_hash(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def token_batch(n: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WEIGHTPATCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine may be busy


def tiny_texts(n: int, seed: int = 0, length: int = 6) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length - 2, length + 3, (n,), generator=g)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    return [" ".join(letters[int(t)] for t in torch.randint(0, len(letters), (int(k),), generator=g)) for k in lengths]


@pytest.fixture(scope="session")
def llama_pair_dirs(tmp_path_factory):
    return make_pair("llama", tmp_path_factory.mktemp("llama-pair"))


def write_prompts(path: Path, n: int = 16, seed: int = 0) -> Path:
    """Paired prompts (with / without a no-comma instruction) the tiny tokenizer can encode."""
    r = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            body = " ".join(r.choice("abcdefghij") for _ in range(r.randint(3, 6)))
            record = {
                "key": i,
                "prompt": f"{body} no comma please",
                "instruction_id_list": ["punctuation:no_comma"],
                "kwargs": [{}],
                "prompt_without_instruction": body,
            }
            f.write(json.dumps(record) + "\n")
    return path
