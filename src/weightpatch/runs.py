"""A finished run directory loaded back in Python: ``weightpatch.load_run(path)``.

No model is loaded: the anchor comes from ``anchor.safetensors``/``anchor.json``, the tables listed
in :mod:`weightpatch.tables` from their Parquet files (their CSV twin when only that is left; nullable
``layer``/``index``, see :mod:`weightpatch.results`; ``scores`` with the rows still pending after a
killed run), the configs and model identities from ``run.json``. :class:`Run` is the one reader of
a run directory: the report, the merge stage and the CLI summary read through it. In a notebook
the returned :class:`Run` displays as a short HTML summary (models, commands, anchor, tables,
findings)::

    import weightpatch
    run = weightpatch.load_run("wpatch-runs/demo")
    run.tables["scores"].query("method == 'exact'")
    run.anchor.vector.shape, run.anchor.layer
    run.config["demo"]["top_k"]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from weightpatch.analysis import Finding, findings
from weightpatch.display import template
from weightpatch.errors import WeightPatchError, reading
from weightpatch.results import Curve, ScoreTable, read_provenance, read_table
from weightpatch.rundir import RUN_FILE, RunDir
from weightpatch.tables import TABLES, schema


@dataclass
class Run:
    """One run directory's results.

    ``config``: command name -> the resolved config it ran with; ``record``: the whole ``run.json``
    (models with their weights' sha256, library versions, timings); ``anchor``: the
    :class:`~weightpatch.anchors.Anchor` (unit vector, layer, method, held-out metrics) or None;
    ``anchor_record``: ``anchor.json`` as a dict; ``tables``: table name -> DataFrame, for the
    tables of :data:`weightpatch.tables.TABLES` present."""

    path: Path
    record: dict[str, Any]
    config: dict[str, dict[str, Any]]
    anchor: Any | None  # weightpatch.anchors.Anchor (imported lazily: it pulls in torch)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    anchor_record: dict[str, Any] | None = None

    def table(self, name: str) -> pd.DataFrame | None:
        """Table ``name`` (one of :data:`weightpatch.tables.TABLES`), ``None`` when the run has no rows of it."""
        schema(name)
        frame = self.tables.get(name)
        return frame if frame is not None and len(frame) else None

    @property
    def scores(self) -> ScoreTable:
        """The long score table (empty when the run has none)."""
        frame = self.tables.get("scores")
        return ScoreTable(frame) if frame is not None else ScoreTable.from_rows([])

    def provenance(self, table: str) -> dict[str, Any] | None:
        """The provenance stored in ``<table>.parquet``'s metadata (models, anchor, config hashes)."""
        return read_provenance(self.path / f"{table}.parquet")

    def findings(self) -> list[Finding]:
        """The report's summary items (``topic``, ``text``, ``values``) computed from the tables
        (:func:`weightpatch.analysis.findings`)."""
        return findings(self)

    def __repr__(self) -> str:
        tables = ", ".join(f"{n} ({len(f)})" for n, f in self.tables.items())
        return f"Run({str(self.path)!r}, commands={list(self.config)}, tables: {tables})"

    def _repr_html_(self) -> str:
        models = [
            {"role": role, "source": m.get("source"), "sha256": str(m.get("weights_sha256"))[:16]}
            for role, m in (self.record.get("models") or {}).items()
            if m
        ]
        tables = [
            {"name": n, "rows": len(f), "columns": ", ".join(map(str, f.columns))} for n, f in self.tables.items()
        ]
        return template("run.html.j2").render(
            path=str(self.path),
            models=models,
            config=self.config,
            anchor=self.anchor,
            tables=tables,
            findings=self.findings(),
        )


def load_run(path: str | os.PathLike) -> Run:
    """Load a run directory written by ``wpatch`` (or the pipeline): configs, anchor (vector and
    metadata) and every result table. Raises :class:`WeightPatchError` when ``path`` is not a run
    directory."""
    root = Path(path)
    record_file = root / RUN_FILE
    if not record_file.is_file():
        raise WeightPatchError(
            f"{root} is not a weightpatch run directory (no {RUN_FILE}); pass the --run-dir of a run"
        )
    with reading(record_file):
        record = json.loads(record_file.read_text(encoding="utf-8"))
    anchor, anchor_record = None, None
    if (root / "anchor.json").is_file():
        from weightpatch.anchors import Anchor

        with reading(root / "anchor.json"):  # a corrupt side file is one line naming it
            anchor_record = json.loads((root / "anchor.json").read_text(encoding="utf-8"))
        anchor = Anchor.load(root / "anchor")
    tables = {name: frame for name in TABLES if (frame := read_run_table(root, name)) is not None}
    for name in ("sufficiency", "necessity"):  # curves draw themselves (.plot()) as the report draws them
        if name in tables:
            tables[name] = Curve(tables[name])
    return Run(root, record, dict(record.get("commands") or {}), anchor, tables, anchor_record)


def read_run_table(root: Path, name: str) -> pd.DataFrame | None:
    """Table ``name`` of run directory ``root`` (``None`` if absent): its Parquet file (``scores``
    with its pending rows), else its CSV twin."""
    frame = RunDir(root).load_table(name)
    if frame is not None:
        return frame
    csv = root / f"{name}.csv"
    return read_table(csv) if csv.is_file() else None


__all__ = ["Run", "load_run"]
