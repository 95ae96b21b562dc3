"""Behavioral evaluation of the demo pair: IFEval strict / loose accuracy and unrequested-format rates.

    python -m weightpatch.demo.evaluate [--models DIR] [--split heldout] [--limit N] [--json OUT]

``DIR`` holds ``base/`` and ``specialized/`` (default: the shipped pair).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from weightpatch import demo
from weightpatch.checkers import evaluate, format_rates
from weightpatch.generation import generate, load_model
from weightpatch.prompts import load_prompts


def evaluate_model(model, tokenizer, records, max_new_tokens: int = 160) -> dict:
    """Accuracy on the records and format rates on their instruction-free forms."""
    responses = generate(model, tokenizer, [r.prompt for r in records], max_new_tokens=max_new_tokens)
    acc, _ = evaluate(records, responses)
    plain = [r.prompt_without_instruction for r in records if r.prompt_without_instruction]
    plain = list(dict.fromkeys(plain))
    plain_responses = generate(model, tokenizer, plain, max_new_tokens=max_new_tokens) if plain else []
    return {
        "accuracy": acc.as_dict(),
        "unrequested_format_rates": format_rates(plain_responses) if plain_responses else {},
        "n_instruction_free": len(plain),
        "examples": [{"prompt": r.prompt, "response": s} for r, s in list(zip(records, responses, strict=True))[:3]],
        "instruction_free_examples": [
            {"prompt": p, "response": s} for p, s in list(zip(plain, plain_responses, strict=True))[:3]
        ],
    }


def table(results: dict[str, dict]) -> str:
    names = list(results)
    first = results[names[0]]["accuracy"]
    ids = list(first["per_instruction_strict"])
    header = "| | " + " | ".join(f"{n} strict | {n} loose" for n in names) + " |"
    lines = [header, "|---" * (1 + 2 * len(names)) + "|"]
    for i in ids:
        cells = []
        for n in names:
            a = results[n]["accuracy"]
            cells += [f"{a['per_instruction_strict'][i]:.3f}", f"{a['per_instruction_loose'][i]:.3f}"]
        lines.append(f"| {i} (n={first['per_instruction_count'][i]}) | " + " | ".join(cells) + " |")
    for level in ("instruction", "prompt"):
        cells = []
        for n in names:
            a = results[n]["accuracy"]
            cells += [f"{a[level + '_strict']:.3f}", f"{a[level + '_loose']:.3f}"]
        lines.append(f"| **{level}-level** | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Unrequested formats on instruction-free prompts (fraction of responses):")
    lines.append("| | " + " | ".join(names) + " |")
    lines.append("|---" * (1 + len(names)) + "|")
    for i in results[names[0]]["unrequested_format_rates"]:
        cells = [f"{results[n]['unrequested_format_rates'][i]:.3f}" for n in names]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--prompts", type=Path, default=None, help="an IFEval JSONL file instead of a split")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: intra-op threads only add synchronization cost
    root = args.models
    dirs = (
        {"base": root / "base", "specialized": root / "specialized"}
        if root
        else {"base": demo.paths().base, "specialized": demo.paths().specialized}
    )
    records = load_prompts(args.prompts) if args.prompts else demo.prompts(args.split)
    records = records[: args.limit] if args.limit else records
    results = {}
    for name, d in dirs.items():
        t0 = time.perf_counter()
        model, tok = load_model(d)
        results[name] = evaluate_model(model, tok, records)
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(table(results))
    for name in results:
        print(f"\n{name} examples:")
        for ex in results[name]["examples"] + results[name]["instruction_free_examples"]:
            print(f"  PROMPT: {ex['prompt']}\n  RESPONSE: {ex['response']!r}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
