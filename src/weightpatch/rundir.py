"""Run directories: everything one analysis produced, resumable and checked against its inputs.

Layout (all files optional except ``run.json``)::

    run.json            commands run here with their resolved configs, the models' identities
                        (source, path, sha256 of the weights) and library versions
    config.yaml         every command's full resolved config, replayable with ``--config``
    log.txt             a log of every command run here
    anchor.safetensors  the anchor vector, anchor.json its metadata
    <table>.parquet     result tables, each with a .csv twin (scores, verified, anchor_layers, ...)
    report.html         the report (``wpatch report``)

Every file is written to a temporary name and renamed, so an interrupted run never leaves a torn
file. Re-running a command on the same directory resumes it (finished results are kept); the run
directory refuses, with a clear message, a command whose configuration differs from the one
recorded for it, or models whose weights (sha256) differ from the recorded ones.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from weightpatch.errors import WeightPatchError
from weightpatch.results import ScoreTable, write_atomic

RUN_FILE = "run.json"
LOG_FILE = "log.txt"
logger = logging.getLogger("weightpatch")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


class RunDir:
    """One run directory. Use :meth:`open` to create or resume it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._handler: logging.Handler | None = None

    # ---- opening, checks ---------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        command: str,
        config: dict[str, Any],
        models: dict[str, Any] | None = None,
        inputs: Iterable[str | os.PathLike] = (),
        full_config: dict[str, Any] | None = None,
    ) -> RunDir:
        """Create or resume ``path`` for ``command`` with the given resolved ``config`` (the fields
        that determine results) and model ``identities`` (from ``ModelPair.identities()``).
        ``full_config`` (every field, run-only ones included) goes into ``config.yaml``, which
        ``--config`` replays.

        Refuses (``WeightPatchError``) when the directory lies inside an input path, when it is
        not a run directory but not empty, when ``command`` was run here with another config, or
        when the models' weights differ from the recorded ones."""
        run = cls(path)
        for source in inputs:
            p = Path(source).expanduser()
            if p.exists() and _is_within(run.path, p):
                raise WeightPatchError(
                    f"run directory {run.path} is inside the input {p}; choose a run directory elsewhere"
                )
        if run.path.exists() and not run.path.is_dir():
            raise WeightPatchError(f"run directory {run.path} exists and is not a directory")
        record = run.record()
        if record is None and run.path.is_dir() and any(run.path.iterdir()):
            raise WeightPatchError(
                f"{run.path} is not empty and is not a weightpatch run directory (no {RUN_FILE}); "
                f"choose a new or empty --run-dir"
            )
        record = record or {"created": datetime.now(timezone.utc).isoformat(), "commands": {}}
        previous = record["commands"].get(command)
        if previous is not None and previous != config:
            changes = "; ".join(_diff(previous, config))
            raise WeightPatchError(
                f"run directory {run.path} holds a `wpatch {command}` run with a different configuration "
                f"({changes}); use another --run-dir, or delete the directory to start over"
            )
        if models is not None:
            run._check_models(record.get("models"), models)
            record["models"] = {r: models[r] for r in ("base", "specialized") if r in models}
            record["architecture"] = models.get("architecture")
            record["versions"] = models.get("versions")
        record["commands"][command] = config
        record.setdefault("configs", {})[command] = full_config if full_config is not None else config
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_record(record)
        run.start_log()
        logger.info("wpatch %s %s", command, "resumed" if previous is not None else "started")
        return run

    def _check_models(self, recorded: dict[str, Any] | None, models: dict[str, Any]) -> None:
        if not recorded:
            return
        for role in ("base", "specialized"):
            old, new = recorded.get(role), models.get(role)
            if old and new and old.get("weights_sha256") != new.get("weights_sha256"):
                raise WeightPatchError(
                    f"run directory {self.path} was made with a different {role} model "
                    f"({old.get('source')}, sha256 {str(old.get('weights_sha256'))[:12]}) than the one given "
                    f"({new.get('source')}, sha256 {str(new.get('weights_sha256'))[:12]}); use another --run-dir"
                )

    def record(self) -> dict[str, Any] | None:
        f = self.path / RUN_FILE
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except ValueError as exc:
            raise WeightPatchError(f"{f} is corrupt ({exc}); use another --run-dir") from exc

    def write_record(self, record: dict[str, Any]) -> None:
        write_text_atomic(self.path / RUN_FILE, json.dumps(record, indent=2, default=str))
        write_text_atomic(
            self.path / "config.yaml", yaml.safe_dump(record.get("configs", record["commands"]), sort_keys=False)
        )

    def update_record(self, **entries: Any) -> None:
        record = self.record() or {"commands": {}}
        record.update(entries)
        self.write_record(record)

    # ---- logging -----------------------------------------------------------------------------
    def start_log(self) -> None:
        if self._handler is not None:
            return
        handler = logging.FileHandler(self.path / LOG_FILE)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        self._handler = handler

    def close(self) -> None:
        if self._handler is not None:
            logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- tables ------------------------------------------------------------------------------
    def table_path(self, name: str) -> Path:
        return self.path / f"{name}.parquet"

    def has(self, name: str) -> bool:
        return self.table_path(name).is_file()

    def save_table(self, name: str, frame: pd.DataFrame) -> Path:
        """Write ``<name>.parquet`` and ``<name>.csv`` atomically."""
        path = self.table_path(name)
        write_atomic(frame, path)
        write_atomic(frame, path.with_suffix(".csv"))
        logger.info("wrote %s (%d rows)", path.name, len(frame))
        return path

    def load_table(self, name: str) -> pd.DataFrame | None:
        path = self.table_path(name)
        return pd.read_parquet(path) if path.is_file() else None

    def scores(self) -> ScoreTable:
        frame = self.load_table("scores")
        return ScoreTable(frame) if frame is not None else ScoreTable.from_rows([])

    def append_scores(self, table: ScoreTable) -> ScoreTable:
        """Add rows to ``scores`` (replacing rows with the same component and method) and save."""
        if not len(table):
            return self.scores()
        merged = ScoreTable.concat([self.scores(), table]).frame
        merged = merged.drop_duplicates(["component", "method"], keep="last").reset_index(drop=True)
        self.save_table("scores", merged)
        return ScoreTable(merged)

    def done(self, method: str) -> set[str]:
        """Component names already scored with ``method``."""
        f = self.scores().frame
        return set(f.loc[f["method"] == method, "component"])

    @property
    def anchor_stem(self) -> Path:
        return self.path / "anchor"
