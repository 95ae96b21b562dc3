"""A finished run directory loaded back in Python: ``weightpatch.load_run(path)``.

No model is loaded: the anchor comes from ``anchor.safetensors``/``anchor.json``, the tables from
their Parquet files (nullable ``layer``/``index``, see :mod:`weightpatch.results`), the configs
and model identities from ``run.json``. In a notebook the returned :class:`Run` displays as a short
HTML summary (models, commands, anchor, tables, findings)::

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

from weightpatch.errors import WeightPatchError
from weightpatch.results import ScoreTable, read_provenance, read_table
from weightpatch.rundir import RUN_FILE


@dataclass
class Run:
    """One run directory's results.

    ``config``: command name -> the resolved config it ran with; ``record``: the whole ``run.json``
    (models with their weights' sha256, library versions, timings); ``anchor``: the
    :class:`~weightpatch.anchors.Anchor` (unit vector, layer, method, held-out metrics) or None;
    ``tables``: table name (file stem) -> DataFrame."""

    path: Path
    record: dict[str, Any]
    config: dict[str, dict[str, Any]]
    anchor: Any | None  # weightpatch.anchors.Anchor (imported lazily: it pulls in torch)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def scores(self) -> ScoreTable:
        """The long score table (empty when the run has none)."""
        frame = self.tables.get("scores")
        return ScoreTable(frame) if frame is not None else ScoreTable.from_rows([])

    def provenance(self, table: str) -> dict[str, Any] | None:
        """The provenance stored in ``<table>.parquet``'s metadata (models, anchor, config hashes)."""
        return read_provenance(self.path / f"{table}.parquet")

    def findings(self) -> list[dict]:
        """The report's summary items (``topic``, ``text``, ``values``) computed from the tables."""
        from weightpatch.report import RunData, findings

        return findings(RunData(self.path))

    def __repr__(self) -> str:
        tables = ", ".join(f"{n} ({len(f)})" for n, f in self.tables.items())
        return f"Run({str(self.path)!r}, commands={list(self.config)}, tables: {tables})"

    def _repr_html_(self) -> str:
        from weightpatch.report import template

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
    try:
        record = json.loads(record_file.read_text())
    except ValueError as exc:
        raise WeightPatchError(f"{record_file} is corrupt ({exc}); the run directory cannot be loaded") from exc
    anchor = None
    if (root / "anchor.json").is_file():
        from weightpatch.anchors import Anchor

        anchor = Anchor.load(root / "anchor")
    tables = {p.stem: read_table(p) for p in sorted(root.glob("*.parquet"))}
    return Run(root, record, dict(record.get("commands") or {}), anchor, tables)


__all__ = ["Run", "load_run"]
