"""Training recipe of the embedded demo pair.

    python -m weightpatch.demo.train --out DIR [--seed 0]

writes ``DIR/base`` and ``DIR/specialized`` (Hugging Face LlamaForCausalLM directories with the
tokenizer, float32 safetensors) and ``DIR/training.json``. Deterministic for a seed on CPU: the corpus
and the data order come from seeded ``random.Random`` instances, the weights from ``torch.manual_seed``.

1. base: pretrained from scratch on :func:`weightpatch.demo.corpus.base_corpus` (loss on all tokens).
2. specialized: the base, all weights fine-tuned on :func:`weightpatch.demo.corpus.sft_corpus`
   (loss on response tokens only).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

import torch

from weightpatch.demo import corpus
from weightpatch.demo.tokenizer import build_tokenizer

MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

DEFAULTS = {
    "base_examples": 12000,
    "base_steps": 700,
    "base_lr": 3e-3,
    "sft_examples": 12000,
    "sft_steps": 600,
    "sft_lr": 1.5e-3,
    "batch_size": 32,
    "warmup": 50,
    "weight_decay": 0.01,
    "vocab_size": 1024,
}


Encoded = list[tuple[list[int], list[int]]]


def _encode(tokenizer, examples: list[corpus.Example], response_only: bool) -> Encoded:
    """Token ids and labels per example (labels -100 on the prompt when ``response_only``)."""
    out = []
    for ex in examples:
        ids = tokenizer(ex.text(), add_special_tokens=False)["input_ids"]
        if response_only and ex.chat:
            prompt_text = corpus.chat_text(ex.prompt, None)
            n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
            labels = [-100] * n_prompt + ids[n_prompt:]
        else:
            labels = list(ids)
        out.append((ids, labels))
    return out


def _batches(data, batch_size: int, steps: int, rng: random.Random, pad_id: int):
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            perm = list(range(len(data)))
            rng.shuffle(perm)
            order.extend(perm)
        idx, order = order[:batch_size], order[batch_size:]
        length = max(len(data[i][0]) for i in idx)
        input_ids = torch.full((batch_size, length), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, length), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, length), dtype=torch.long)
        for row, i in enumerate(idx):
            ids, lab = data[i]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(ids)] = 1
        yield input_ids, mask, labels


def _train(
    model,
    data,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    warmup: int,
    weight_decay: float,
    seed: int,
    pad_id: int,
    label: str,
) -> dict:
    rng = random.Random(f"order:{label}:{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    t0 = time.perf_counter()
    losses = []
    for step, (input_ids, mask, labels) in enumerate(_batches(data, batch_size, steps, rng, pad_id)):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - t0
            print(f"[{label}] step {step:4d}/{steps} loss {loss.item():.4f} ({elapsed:.0f}s)", flush=True)
    model.eval()
    return {
        "steps": steps,
        "lr": lr,
        "seconds": round(time.perf_counter() - t0, 1),
        "final_loss_mean_last_20": round(sum(losses[-20:]) / len(losses[-20:]), 4),
    }


def train_pair(out: Path, seed: int = 0, **overrides) -> dict:
    """Train the base and the specialized model into ``out``; return the training record."""
    import tokenizers
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    hp = {**DEFAULTS, **overrides}
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    random.seed(seed)
    t_start = time.perf_counter()

    tokenizer = build_tokenizer(corpus.tokenizer_corpus(seed), vocab_size=hp["vocab_size"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_CONFIG,
    )
    model = LlamaForCausalLM(config)
    common = {
        "batch_size": hp["batch_size"],
        "warmup": hp["warmup"],
        "weight_decay": hp["weight_decay"],
        "seed": seed,
        "pad_id": tokenizer.pad_token_id,
    }

    base_data = _encode(tokenizer, corpus.base_corpus(hp["base_examples"], seed), response_only=False)
    base_record = _train(model, base_data, steps=hp["base_steps"], lr=hp["base_lr"], label="base", **common)
    _save(model, tokenizer, out / "base")

    sft_data = _encode(tokenizer, corpus.sft_corpus(hp["sft_examples"], seed), response_only=True)
    sft_record = _train(model, sft_data, steps=hp["sft_steps"], lr=hp["sft_lr"], label="specialized", **common)
    _save(model, tokenizer, out / "specialized")

    record = {
        "seed": seed,
        "hyperparameters": hp,
        "model_config": MODEL_CONFIG,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "base": base_record,
        "specialized": sft_record,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "machine": platform.machine(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _save(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the embedded demo pair (base, specialized).")
    parser.add_argument("--out", type=Path, required=True, help="directory to write base/ specialized/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=DEFAULTS["base_steps"])
    parser.add_argument("--sft-steps", type=int, default=DEFAULTS["sft_steps"])
    args = parser.parse_args(argv)
    record = train_pair(args.out, seed=args.seed, base_steps=args.base_steps, sft_steps=args.sft_steps)
    print(json.dumps({k: record[k] for k in ("base", "specialized", "total_seconds")}, indent=2))


if __name__ == "__main__":
    main()
