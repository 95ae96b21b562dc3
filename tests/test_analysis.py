"""Findings apart from presentation (issue 29, item 3): pure functions over a run's tables, one
ranking of top components for the report and the CLI summary, no HTML module behind Run.findings()."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from weightpatch import analysis
from weightpatch.cli.summary import top_components_table
from weightpatch.results import ScoreTable

ROOT = Path(__file__).resolve().parents[1]


def _wide(**columns) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    return pd.DataFrame({"component": [f"L0.attn.head{i}" for i in range(n)], "kind": "head", **columns})


def test_top_components_rank_by_exact_where_it_scored_anything():
    wide = _wide(exact=[0.1, -0.5, np.nan, 0.3], first_order=[0.9, 0.0, 0.8, 0.1])
    key, top = analysis.top_components(wide, 2)
    assert key == "exact" and top["component"].tolist() == ["L0.attn.head1", "L0.attn.head3"]


def test_top_components_fall_back_in_order_and_keep_ties_in_table_order():
    wide = _wide(exact=[np.nan] * 4, first_order=[0.2, -0.4, 0.4, 0.2], integrated_gradients=[1.0] * 4)
    key, top = analysis.top_components(wide)
    assert key == "first_order"
    assert top["component"].tolist() == ["L0.attn.head1", "L0.attn.head2", "L0.attn.head0", "L0.attn.head3"]
    key, _ = analysis.top_components(wide.drop(columns=["exact", "first_order"]))
    assert key == "integrated_gradients"
    assert analysis.top_components(wide[["component", "kind"]]) is None


def test_the_cli_summary_ranks_with_the_same_function():
    frame = pd.DataFrame(
        {
            "component": ["L0.attn.head0", "L0.attn.head1", "L1.mlp", "L0.attn.head0", "L0.attn.head1", "L1.mlp"],
            "kind": ["head", "head", "module"] * 2,
            "layer": [0, 0, 1] * 2,
            "index": [0, 1, None] * 2,
            "method": ["exact"] * 3 + ["first_order"] * 3,
            "score": [0.1, -0.6, 0.3, 0.5, 0.2, 0.1],
            "stderr": 0.01,
        }
    )
    table = ScoreTable(frame)
    key, ranked = analysis.top_components(table.side_by_side(), 2)
    printed = top_components_table(table, 2)
    assert key == "exact" and printed is not None and f"|{key}|" in str(printed.title)
    assert list(printed.columns[0].cells) == ranked["component"].tolist() == ["L0.attn.head1", "L1.mlp"]


class _View:
    """A run as findings see it (analysis.RunView): no run reader, no directory."""

    def __init__(self, tables: dict[str, pd.DataFrame], record: dict | None = None, anchor: dict | None = None):
        self.tables, self.record, self.anchor_record = tables, record or {}, anchor

    def table(self, name: str) -> pd.DataFrame | None:
        return self.tables.get(name)


def test_findings_are_computed_from_any_run_view():
    scores = pd.DataFrame(
        {
            "component": ["L0.attn.head0", "L0.attn.head1", "L0.attn.head2"] * 2,
            "kind": "head",
            "layer": 0,
            "index": [0, 1, 2] * 2,
            "method": ["exact"] * 3 + ["first_order"] * 3,
            "score": [0.2, 0.7, -0.1, 0.25, 0.6, -0.2],
            "stderr": [0.01, 0.02, 0.03, 0.01, 0.01, 0.01],
        }
    )
    view = _View({"scores": scores}, {"screening": {"n_prompts": 10, "n_excluded": 1}}, {"layer": 2, "metrics": {}})
    items = {f["topic"]: f for f in analysis.findings(view)}
    assert list(items) == ["Anchor", "Top components", "Limits"]
    assert items["Top components"]["values"]["components"] == ["L0.attn.head1", "L0.attn.head0", "L0.attn.head2"]
    assert items["Top components"]["text"].startswith("largest exact scores at the source: L0.attn.head1 0.700 ± 0.020")
    assert items["Limits"]["values"]["n"] == 3 and items["Limits"]["values"]["overlap"] == 3
    assert analysis.findings(_View({})) == []


def test_run_findings_do_not_import_the_report(tmp_path):
    code = (
        "import sys; from weightpatch.runs import Run; "
        f"Run(__import__('pathlib').Path({str(tmp_path)!r}), {{}}, {{}}, None).findings(); "
        "assert 'weightpatch.report' not in sys.modules and 'weightpatch.figures' not in sys.modules"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
