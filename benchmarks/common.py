"""Shared helpers for the benchmark scripts: pairs, prompts, timing and the RESULTS.md log."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "RESULTS.md"


def pair_and_prompts(name: str):
    """(base_dir, specialized_dir, with-instruction prompts, without-instruction prompts)."""
    if name == "demo":
        from weightpatch import demo

        paths = demo.paths()
        records = demo.prompts("anchor") + demo.prompts("heldout")
        with_i = [r.prompt for r in records]
        without = [r.prompt_without_instruction for r in records]
        return paths.base, paths.specialized, with_i, without
    if name in ("smollm2", "smollm2-heavy"):
        sys.path.insert(0, str(Path(__file__).parent))
        import real_pair

        base, sft = real_pair.build(heavy=name == "smollm2-heavy")
        return base, sft, real_pair.prompts(True), real_pair.prompts(False)
    raise SystemExit(f"unknown pair {name!r}: use demo, smollm2 or smollm2-heavy")


@contextmanager
def timed(store: dict, key: str):
    start = time.perf_counter()
    yield
    store[key] = time.perf_counter() - start


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def record(title: str, rows: list[dict], notes: str = "") -> None:
    """Print the table and append it to RESULTS.md with the command that produced it."""
    table = markdown_table(rows)
    print(table)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    with RESULTS.open("a") as fh:
        fh.write(f"\n## {title}\n\n`{command}` ({stamp}; {machine})\n\n{table}\n")
        if notes:
            fh.write(f"\n{notes}\n")
