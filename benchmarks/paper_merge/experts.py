"""Experts in the paper's setting (issue 28): full fine-tunes of SmolLM2-135M-Instruct on code-generated
IF, MATH and CODE data (``data.py``), plus a joint fine-tune on the union, built, evaluated and cached
under ``~/.cache/weightpatch-bench/paper-merge``. Every stage is cached and the script resumes where it
stopped; each expert directory carries ``training.json`` (steps, seconds, data sizes, per-layer relative
weight change) and ``evaluations/<skill>-<split>.json`` (responses and per-item correctness).

    OMP_NUM_THREADS=1 python benchmarks/paper_merge/experts.py            # all stages, in order
    OMP_NUM_THREADS=1 python benchmarks/paper_merge/experts.py --report   # the table of what is built

Stages: base model, base accuracy on MATH (range check), the base's own answers to the IF training
prompts (the IF targets), the IF / MATH / CODE experts, every model on every skill's test split, the
joint fine-tune and its evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import real_pair  # noqa: E402
from paper_merge import data  # noqa: E402
from paper_merge.sandbox import run_tests  # noqa: E402
from real_experts import relative_change_per_layer  # noqa: E402
from weightpatch.demo.train import _train  # noqa: E402
from weightpatch.generation import generate, load_model  # noqa: E402
from weightpatch.runner import render_prompts  # noqa: E402

ROOT = real_pair.WORK / "paper-merge"
BASE = real_pair.BASE
SKILLS = ("if", "math", "code")
MAX_NEW_TOKENS = {"if": 48, "math": 48, "code": 72, "composite": 48}
TRAINING = {  # full fine-tunes, AdamW, warmup 10 then cosine to 10%, clip 1.0, response-only loss
    # steps are few because a step of 8 sequences of ~100 tokens costs 10-130 s on this shared CPU
    "if": {"steps": 80, "lr": 1e-4, "batch_size": 8},
    "math": {"steps": 120, "lr": 1e-4, "batch_size": 8},
    "code": {"steps": 100, "lr": 1e-4, "batch_size": 8},
    "joint": {"steps": 240, "lr": 1e-4, "batch_size": 8},
}
GEN_BATCH = 48


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def model_dir(name: str) -> Path:
    """Where model ``name`` (``base``, ``if``, ``math``, ``code``, ``joint``) lives."""
    return BASE if name == "base" else ROOT / f"expert-{name}"


def write_json(path: Path, value) -> None:
    """Atomic JSON write (a temporary file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- scoring


def score(item: data.Item, response: str) -> bool | None:
    """Whether ``response`` solves ``item`` (None: an uninstructed IF item, scored as false format)."""
    if item.skill == "if":
        return None if item.constraint is None else data.if_correct(item, response)
    if item.skill == "math":
        return data.math_correct(item, response)
    if item.skill == "composite":
        return data.composite_correct(item, response)
    return run_tests(data.extract_code(response), item.entry, item.tests).ok


def responses(model, tok, items: list[data.Item], max_new_tokens: int) -> list[str]:
    """Greedy responses in ``items`` order, generated in batches of similar prompt length."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt))
    out = generate(model, tok, [items[i].prompt for i in order], max_new_tokens=max_new_tokens, batch_size=GEN_BATCH)
    result = [""] * len(items)
    for i, r in zip(order, out, strict=True):
        result[i] = r
    return result


def evaluate(model, tok, skill: str, split: str, out: Path, limit: int | None = None) -> dict:
    """Responses and per-item scores of ``model`` on ``skill``/``split`` (first ``limit`` items), cached
    as ``out``: {"responses", "correct", "false_format" (IF), "accuracy", "seconds"}."""
    if out.exists():
        return json.loads(out.read_text())
    items = data.items(skill, split)[:limit]
    start = time.time()
    texts = responses(model, tok, items, MAX_NEW_TOKENS[skill])
    correct = [score(it, r) for it, r in zip(items, texts, strict=True)]
    scored = [c for c in correct if c is not None]
    result = {
        "skill": skill,
        "split": split,
        "n": len(scored),
        "accuracy": sum(scored) / len(scored),
        "correct": correct,
        "responses": texts,
        "seconds": round(time.time() - start, 1),
    }
    if skill == "if":
        plain = [data.false_format(r) for it, r in zip(items, texts, strict=True) if it.constraint is None]
        result["false_format"] = sum(plain) / len(plain)
        result["false_format_n"] = len(plain)
    write_json(out, result)
    return result


# ---------------------------------------------------------------- training data


def if_base_answers(tok=None, model=None) -> dict[str, str]:
    """The base model's own answers (first sentence) to the uninstructed IF train/val prompts, cached."""
    path = ROOT / "if_base_answers.json"
    if path.exists():
        return json.loads(path.read_text())
    questions = sorted(
        {
            t.format(t=topic)
            for split in ("train", "val")
            for topic in data.IF_TOPICS[split]
            for t in data.IF_TEMPLATES[split]
        }
    )
    items = [data.Item("if", q) for q in questions]
    log(f"base answers to {len(items)} IF questions")
    texts = responses(model, tok, items, MAX_NEW_TOKENS["if"])
    answers = {q: data.base_answer(r) for q, r in zip(questions, texts, strict=True)}
    write_json(path, answers)
    return answers


def plain_question(item: data.Item) -> str:
    """An IF prompt without its instruction."""
    return (
        item.prompt.removesuffix(" " + data.IF_CONSTRAINTS[item.constraint]["instruction"])
        if item.constraint
        else item.prompt
    )


def training_pairs(skill: str, answers: dict[str, str], split: str = "train") -> list[tuple[str, str]]:
    """(prompt, target response) pairs of ``skill`` (``joint``: the union of the three)."""
    if skill == "joint":
        return [p for s in SKILLS for p in training_pairs(s, answers, split)]
    items = data.items(skill, split)
    if skill == "if":
        return [(it.prompt, data.if_target(answers[plain_question(it)], it.constraint)) for it in items]
    return [(it.prompt, it.target) for it in items]


def encode_pairs(tok, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (-100 on the prompt) of each chat-rendered (prompt, response)."""
    out = []
    for prompt, response in pairs:
        p = tok(render_prompts(tok, [prompt])[0], add_special_tokens=False)["input_ids"]
        r = tok(response + tok.eos_token, add_special_tokens=False)["input_ids"]
        out.append((p + r, [-100] * len(p) + r))
    return out


def train(name: str, answers: dict[str, str], seed: int = 0) -> Path:
    """Fine-tune the base into expert ``name`` (cached): ``TRAINING[name]`` hyper-parameters."""
    out = model_dir(name)
    if (out / "training.json").exists():
        return out
    hp = TRAINING[name]
    torch.manual_seed(seed)
    model, tok = load_model(BASE)
    pairs = training_pairs(name, answers)
    random.Random(seed).shuffle(pairs)
    log(f"training {name}: {len(pairs)} pairs, {hp}")
    record = _train(
        model,
        encode_pairs(tok, pairs),
        steps=hp["steps"],
        lr=hp["lr"],
        batch_size=hp["batch_size"],
        warmup=10,
        weight_decay=0.0,
        seed=seed,
        pad_id=tok.pad_token_id,
        label=name,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    change = relative_change_per_layer(BASE, tmp)
    write_json(
        tmp / "training.json",
        {
            "expert": name,
            **record,
            "batch_size": hp["batch_size"],
            "seed": seed,
            "train_pairs": len(pairs),
            "torch_threads": torch.get_num_threads(),
            "relative_change_per_layer": [round(c, 6) for c in change],
        },
    )
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def evaluate_model_dir(
    name: str, skills: tuple[str, ...] = (*SKILLS, "composite"), split: str = "test"
) -> dict[str, dict]:
    """``name`` on every skill's ``split`` (cached per skill)."""
    path = model_dir(name)
    target = ROOT / "evaluations" / name
    missing = [s for s in skills if not (target / f"{s}-{split}.json").exists()]
    if missing:
        model, tok = load_model(path)
    results = {}
    for s in skills:
        log(f"evaluating {name} on {s}/{split}")
        results[s] = evaluate(
            model if missing else None, tok if missing else None, s, split, target / f"{s}-{split}.json"
        )
        log(f"{name} {s}/{split}: {results[s]['accuracy']:.3f} ({results[s]['seconds']} s)")
    return results


def build() -> None:
    """Every stage, in order, each cached."""
    torch.set_num_threads(1)
    ROOT.mkdir(parents=True, exist_ok=True)
    real_pair.build_base()
    evaluate_model_dir("base", ("math",), "val")  # the range check (base 10-30%), 40 items
    model, tok = load_model(BASE)
    answers = if_base_answers(tok, model)
    del model
    for name in SKILLS:
        train(name, answers)
    for name in ("base", *SKILLS):
        evaluate_model_dir(name)
    train("joint", answers)
    evaluate_model_dir("joint")
    log("done")


def report() -> list[dict]:
    """One row per built model: accuracy on each skill's test split, false-format rate, training record."""
    rows = []
    for name in ("base", *SKILLS, "joint"):
        row: dict = {"model": name}
        for s in (*SKILLS, "composite"):
            path = ROOT / "evaluations" / name / f"{s}-test.json"
            row[s] = json.loads(path.read_text())["accuracy"] if path.exists() else "-"
            if s == "if" and path.exists():
                row["false_format"] = json.loads(path.read_text())["false_format"]
        info = model_dir(name) / "training.json"
        if name != "base" and info.exists():
            rec = json.loads(info.read_text())
            change = rec["relative_change_per_layer"]
            row.update(steps=rec["steps"], seconds=rec["seconds"], train_pairs=rec["train_pairs"])
            row["rel_change_min/median/max"] = (
                f"{min(change):.1e}/{sorted(change)[len(change) // 2]:.1e}/{max(change):.1e}"
            )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="print the table of what is built and stop")
    args = parser.parse_args()
    if args.report:
        for row in report():
            print(row)
        return
    build()


if __name__ == "__main__":
    main()
