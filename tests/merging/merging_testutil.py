"""Tiny random Llama checkpoints shared by the merging tests (each test module wraps
:func:`build_tiny_checkpoints` in its own fixture; no conftest here, so ``conftest`` stays
``tests/conftest.py`` for the other test packages)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )


def save_tiny(path: Path, seed: int, base_state: dict | None = None, scale: float = 0.02, **kw) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    if base_state is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base_state[name] + scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(path, **kw)
    return path


def dir_hashes(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def build_tiny_checkpoints(root: Path) -> tuple[Path, Path, Path]:
    """(base, expert_a, expert_b) under ``root``: expert_b is sharded (several files + index)."""
    from transformers import AutoModelForCausalLM

    base = save_tiny(root / "base", 0)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    state = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(base).named_parameters()}
    a = save_tiny(root / "expert_a", 1, state)
    b = save_tiny(root / "expert_b", 2, state, max_shard_size="20KB")
    return base, a, b
