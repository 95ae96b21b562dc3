"""benchmarks/RESULTS.md keeps one current section per benchmark: a new run replaces its section in
place and the replaced one moves to HISTORY.md (RESULTS.md repeated one section up to four times)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import file_section, sections  # noqa: E402


def test_a_new_run_replaces_its_section_and_the_old_one_goes_to_history(tmp_path):
    results = tmp_path / "RESULTS.md"
    for title, body in (("A", "first a"), ("B", "only b"), ("A", "second a"), ("A", "third a")):
        file_section(title, f"## {title}\n\n{body}\n", results)
    assert [(t, s.split("\n\n")[1].strip()) for t, s in sections(results.read_text())] == [
        ("A", "third a"),
        ("B", "only b"),
    ]
    history = [s.split("\n\n")[1].strip() for _, s in sections((tmp_path / "HISTORY.md").read_text())]
    assert history == ["first a", "second a"]  # oldest first


def test_the_repositorys_results_hold_each_benchmark_once():
    titles = [t for t, _ in sections((ROOT / "benchmarks" / "RESULTS.md").read_text())]
    assert titles and len(titles) == len(set(titles))
