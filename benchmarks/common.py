"""Shared helpers for the benchmark scripts: pairs, prompts, timing and the RESULTS.md log.

RESULTS.md holds one current section per benchmark (its title): a new run of a benchmark replaces
its section there, and the section it replaces moves to the end of HISTORY.md."""

from __future__ import annotations

import datetime
import platform
import re
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "RESULTS.md"
HISTORY = Path(__file__).parent / "HISTORY.md"
HEADER = {
    "RESULTS.md": "# Benchmark results: the latest run of each benchmark\n\n"
    "Each section: the command, when and where it ran, its table. Earlier runs are in [HISTORY.md](HISTORY.md).\n",
    "HISTORY.md": "# Earlier benchmark runs, oldest first\n\n"
    "Replaced in [RESULTS.md](RESULTS.md) by a later run of the same benchmark.\n",
}


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


def sections(text: str) -> list[tuple[str, str]]:
    """``(title, text)`` of each ``## title`` section of a results file, in order (the header dropped)."""
    parts = re.split(r"(?m)^(?=## )", text)
    return [(part.splitlines()[0][3:].strip(), part.rstrip() + "\n") for part in parts if part.startswith("## ")]


def write_sections(path: Path, items: list[tuple[str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(HEADER[path.name] + "".join(f"\n{text}" for _, text in items))
    tmp.replace(path)


def file_section(title: str, text: str, results: Path = RESULTS) -> None:
    """Make ``text`` the current section ``title`` of ``results`` (RESULTS.md); the one it replaces goes to
    the end of HISTORY.md beside it."""
    history_file = results.with_name(HISTORY.name)
    current = sections(results.read_text()) if results.is_file() else []
    replaced = [item for item in current if item[0] == title]
    if replaced:
        history = sections(history_file.read_text()) if history_file.is_file() else []
        write_sections(history_file, history + replaced)
    kept = [(t, text if t == title else old) for t, old in current]  # in place, the order stays
    write_sections(results, kept if replaced else [*kept, (title, text)])


def record(title: str, rows: list[dict], notes: str = "") -> None:
    """Print the table and file it in RESULTS.md (:func:`file_section`) with the command that produced it."""
    table = markdown_table(rows)
    print(table)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    text = f"## {title}\n\n`{command}` ({stamp}; {machine})\n\n{table}\n" + (f"\n{notes}\n" if notes else "")
    file_section(title, text)
