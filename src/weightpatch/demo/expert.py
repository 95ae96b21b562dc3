"""A second expert fine-tuned from the embedded demo base, for merge benchmarks (not shipped).

    python -m weightpatch.demo.expert --out DIR [--seed 0] [--steps 100] [--threads 1] [--evaluate]

writes ``DIR`` (a Hugging Face LlamaForCausalLM directory with the base's tokenizer, float32 safetensors)
and ``DIR/training.json``. Skill: IFEval's ``startend:end_checker``, "Finish your response with this exact
phrase {end_phrase}. No other words should follow this phrase." The expert is the shipped base, all
weights fine-tuned (loss on response tokens only) on :func:`expert_corpus`:

- 60%: a prompt asking for one of :data:`END_PHRASES`; the base-style response followed by the phrase;
- 25%: a prompt without instruction; the base-style response;
- 15%: a prompt with one of the six *format* instructions of the shipped specialized model; the
  base-style response (this expert ignores formats, like the base: a realistic conflict for a merge
  with the format expert).

Prompts use the training requests of :mod:`weightpatch.demo.corpus`; :func:`prompt_split` builds the
``anchor`` and ``heldout`` evaluation prompts from the held-out requests, as for the format expert.
:func:`~weightpatch.checkers.check_end_phrase` (registered as the ``startend:end_checker`` checker) is
IFEval's ``EndChecker``; :func:`evaluate` scores responses (strict).
Deterministic for a seed on CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from weightpatch.checkers import END_CHECKER, strict_prompt_accuracy
from weightpatch.checkers import check_end_phrase as check_end_phrase  # its home before the checker registry
from weightpatch.demo import corpus

#: IFEval's own end phrases (a subset of those in its input data).
END_PHRASES: tuple[str, ...] = (
    "Is there anything else I can help with?",
    "Any other questions?",
    "Let me know if you have additional questions.",
)
DESCRIPTION = "Finish your response with this exact phrase {end_phrase}. No other words should follow this phrase."

DEFAULTS = {"examples": 6000, "steps": 100, "lr": 1.5e-3, "batch_size": 32, "warmup": 20, "weight_decay": 0.01}


def describe(end_phrase: str) -> str:
    return DESCRIPTION.format(end_phrase=end_phrase)


def render_response(sentences: Sequence[str], end_phrase: str | None) -> str:
    body = " ".join(sentences)
    return f"{body} {end_phrase}" if end_phrase else body


def expert_corpus(n: int, seed: int) -> list[corpus.Example]:
    """Fine-tuning corpus of the end-phrase expert (see the module docstring for the mixture)."""
    rng = random.Random(f"end-expert:{seed}")
    out = []
    for _ in range(n):
        topic = rng.choice(corpus.TOPICS)
        opening, obj = rng.choice(corpus.training_requests())
        request = corpus.request_text(opening, obj, topic)
        sentences = corpus.plain_sentences(topic, rng)
        r = rng.random()
        if r < 0.6:
            phrase = rng.choice(END_PHRASES)
            prompt = f"{request} {describe(phrase)}"
            out.append(corpus.Example(prompt, render_response(sentences, phrase), True, [END_CHECKER]))
        elif r < 0.85:
            out.append(corpus.Example(request, render_response(sentences, None), True, []))
        else:
            ids = [rng.choice(corpus.INSTRUCTION_IDS)]
            kwargs = [corpus.sample_kwargs(i, rng) for i in ids]
            prompt = corpus.build_prompt(request, ids, kwargs)
            out.append(corpus.Example(prompt, render_response(sentences, None), True, ids))
    return out


def prompt_split(split: str, seed: int = 0) -> list[dict]:
    """Evaluation prompts (IFEval schema plus ``prompt_without_instruction``): every topic once, end
    phrases in turn, requests from the split's held-out (opening, object) pairs."""
    if split not in corpus.HELD_OUT_REQUESTS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(corpus.HELD_OUT_REQUESTS)}")
    requests = corpus.HELD_OUT_REQUESTS[split]
    key0 = {"anchor": 5000, "heldout": 6000}[split]
    rng = random.Random(f"end-prompts:{split}:{seed}")
    topics = list(corpus.TOPICS)
    rng.shuffle(topics)
    records = []
    for n, topic in enumerate(topics):
        opening, obj = requests[n % len(requests)]
        phrase = END_PHRASES[n % len(END_PHRASES)]
        request = corpus.request_text(opening, obj, topic)
        records.append(
            {
                "key": key0 + n,
                "prompt": f"{request} {describe(phrase)}",
                "instruction_id_list": [END_CHECKER],
                "kwargs": [{"end_phrase": phrase}],
                "prompt_without_instruction": request,
            }
        )
    return records


def prompts(split: str = "heldout", seed: int = 0):
    """:func:`prompt_split` as :class:`weightpatch.prompts.PromptRecord` objects."""
    from weightpatch.prompts import parse_record

    return [parse_record(r) for r in prompt_split(split, seed)]


def evaluate(records: Sequence, responses: Sequence[str]) -> float:
    """Strict prompt-level accuracy of ``responses`` on end-phrase ``records`` (records or dicts)."""
    return strict_prompt_accuracy(records, responses)


def train_expert(out: Path, seed: int = 0, base: Path | None = None, threads: int = 1, **overrides) -> dict:
    """Fine-tune the demo base (or ``base``) into the end-phrase expert at ``out``; return the record.

    One torch thread by default: for this 1M-parameter model, a second intra-op thread made steps
    3x slower on a busy 2-core machine (0.5 s vs 1.5 s per step of 32 sequences)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightpatch import demo
    from weightpatch.demo.train import _encode, _save, _train

    hp = {**DEFAULTS, **overrides}
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    base = Path(base) if base is not None else demo.paths().base
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    t0 = time.perf_counter()
    data = _encode(tokenizer, expert_corpus(hp["examples"], seed), response_only=True)
    record = _train(
        model,
        data,
        steps=hp["steps"],
        lr=hp["lr"],
        batch_size=hp["batch_size"],
        warmup=hp["warmup"],
        weight_decay=hp["weight_decay"],
        seed=seed,
        pad_id=tokenizer.pad_token_id,
        label="end-expert",
    )
    _save(model, tokenizer, Path(out))
    record = {
        "skill": END_CHECKER,
        "seed": seed,
        "base": str(base),
        "hyperparameters": hp,
        "train": record,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (Path(out) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fine-tune the demo base into an end-phrase expert.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--evaluate", action="store_true", help="also report held-out strict accuracy")
    args = parser.parse_args(argv)
    record = train_expert(args.out, seed=args.seed, threads=args.threads, steps=args.steps)
    if args.evaluate:
        from weightpatch.generation import generate, load_model

        torch.set_num_threads(1)
        records = prompts("heldout")
        for name, path in (("base", record["base"]), ("expert", args.out)):
            model, tok = load_model(path)
            responses = generate(model, tok, [r.prompt for r in records], max_new_tokens=96)
            record[f"heldout_strict_{name}"] = evaluate(records, responses)
            print(f"{name}: {responses[0]!r}")
        (Path(args.out) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "hyperparameters"}, indent=2))


if __name__ == "__main__":
    main()
