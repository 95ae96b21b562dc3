"""The short summary printed at the end of a run: top components, roles and the merge table when
the run directory has them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.table import Table

from weightpatch.analysis import top_components
from weightpatch.cli import common
from weightpatch.results import ScoreTable
from weightpatch.runs import load_run


def _fmt(value) -> str:
    try:
        return "" if pd.isna(value) else f"{float(value):+.3f}"
    except (TypeError, ValueError):
        return str(value)


def top_components_table(table: ScoreTable, n: int = 10) -> Table | None:
    if not len(table):
        return None
    ranked = top_components(table.side_by_side(), n)  # the report's ranking (weightpatch.analysis)
    if ranked is None:
        return None
    key, wide = ranked
    methods = [m for m in ("exact", "first_order", "integrated_gradients", "activation") if m in wide.columns]
    t = Table(title=f"top components (fraction of anchor gap recovered, ranked by |{key}|)")
    t.add_column("component")
    t.add_column("kind")
    for m in methods:
        t.add_column(m, justify="right")
    for _, row in wide.iterrows():
        t.add_row(row["component"], row["kind"], *(_fmt(row[m]) for m in methods))
    return t


def frame_table(frame: pd.DataFrame, title: str, n: int = 10) -> Table:
    t = Table(title=title)
    cols = list(frame.columns)[:8]
    for c in cols:
        t.add_column(str(c))
    for _, row in frame.head(n).iterrows():
        t.add_row(*(_fmt(row[c]) if isinstance(row[c], float) else str(row[c]) for c in cols))
    return t


def print_summary(run_dir: Path, table: ScoreTable | None = None) -> None:
    run = load_run(run_dir)
    table = table if table is not None else run.scores
    top = top_components_table(table)
    if top is not None:
        common.out.print(top)
    roles = run.table("roles")
    if roles is not None:
        shown = roles[roles["role"] != "neither"].sort_values("weight", ascending=False, key=abs)
        common.out.print(
            frame_table(
                shown[["component", "kind", "activation", "weight", "role"]],
                "component roles (activation- vs weight-space effect)",
            )
        )
    validity = run.record.get("anchor_validity")
    if validity:
        style = "bold yellow" if validity["status"] in ("misleads", "under-reports") else ""
        common.out.print(validity["line"], style=style, soft_wrap=True)
    merges = run.table("merge_table")
    if merges is not None:
        common.out.print(frame_table(merges, "merges"))
