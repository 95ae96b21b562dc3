"""Run directories: everything one analysis produced, resumable and checked against its inputs.

Layout (all files optional except ``run.json``)::

    run.json            commands run here with their resolved configs, the SHA-256 of their input
                        files, the models' identities (source, path, sha256 of the weights) and
                        library versions
    config.yaml         every command's full resolved config, replayable with ``--config``
    log.txt             a log of every command run here
    .wpatch.lock        the advisory lock of the process writing here (its PID inside)
    anchor.safetensors  the anchor vector, anchor.json its metadata
    <table>.parquet     result tables, each with a .csv twin (scores, verified, anchor_layers, ...)
    scores.pending.jsonl  score rows appended since ``scores.parquet`` was last compacted
    report.html         the report (``wpatch report``)

Writes never follow a symbolic link out of the directory: a run directory holding a link is
refused when opened, and the lock and pending scores are opened with ``O_NOFOLLOW``. Every table and record is written
to a temporary name and renamed
(:func:`weightpatch.results.atomic_output`), so an interrupted run never leaves a torn file; the
temporaries of a killed run are removed when the directory is next opened. Score rows are appended
group by group to ``scores.pending.jsonl`` (one JSON object a line, one ``write`` per group, so the
cost of a group does not grow with the table; a line torn by a kill is dropped) and folded into
``scores.parquet``/``scores.csv`` when the writer reads the scores, opens or closes the directory.

A command refused (one-line error) before it wrote any result leaves the record as it was, so the
corrected inputs are not refused as "different" on the re-run. Re-running a command on the same
directory resumes it (finished results are kept); the run
directory refuses, with a one-line message naming what changed, a command whose configuration or
input files (by content: SHA-256, not path) differ from the ones recorded for it, or models whose
weights (sha256) differ from the recorded ones. One process writes at a time: :meth:`RunDir.open`
takes an ``fcntl.flock`` lock, released on :meth:`RunDir.close` or when the process dies.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from weightpatch.errors import WeightPatchError, writing
from weightpatch.results import TMP_SUFFIX, ScoreTable, provenance, read_table, write_atomic, write_text_atomic
from weightpatch.tables import check_frame
from weightpatch.weights import files_sha256

RUN_FILE = "run.json"
LOG_FILE = "log.txt"
LOCK_FILE = ".wpatch.lock"
PENDING_SCORES = "scores.pending.jsonl"
SCORE_KEY = ["component", "method"]
CONSOLE = {"console": True}  # ``logger.info(..., extra=CONSOLE)``: shown by the CLI too, not only in log.txt
logger = logging.getLogger("weightpatch")

_held_locks: dict[str, list[int]] = {}  # resolved lock path -> [file descriptor, open count] in this process


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _writing(path: Path) -> AbstractContextManager[None]:
    """Errors while writing in the run directory ``path`` as one-line messages."""
    return writing(path, "--run-dir", "run directory")


def input_files(inputs: Iterable[str | os.PathLike]) -> list[dict[str, str]]:
    """``{"path", "sha256"}`` of every input that is a file (model directories and hub ids are
    identified by their weights instead), in the given order; the path is absolute."""
    paths = [p for p in (Path(s).expanduser() for s in inputs) if p.is_file()]
    try:
        digests = files_sha256(paths)
    except OSError as exc:
        raise WeightPatchError(f"cannot read input file {exc.filename} ({exc.strerror or exc})") from exc
    return [{"path": str(p.resolve()), "sha256": d} for p, d in zip(paths, digests, strict=True)]


def _input_changes(old: list[dict[str, str]], new: list[dict[str, str]]) -> list[str]:
    if len(old) != len(new):
        return [f"{len(old)} input files -> {len(new)} ({', '.join(Path(f['path']).name for f in new) or 'none'})"]
    return [
        f"{Path(b['path']).name} (sha256 {a['sha256'][:12]} -> {b['sha256'][:12]})"
        for a, b in zip(old, new, strict=True)
        if a["sha256"] != b["sha256"]
    ]


class RunDir:
    """One run directory. ``RunDir(path)`` reads it; :meth:`open` creates or resumes it for
    writing (checked, locked)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._handler: logging.Handler | None = None
        self._lock_key: str | None = None
        self._provenance: dict[str, Any] | None = None  # stamped into every Parquet table written
        self._before: dict[str, Any] | None = None  # the record before open() registered this command
        self._wrote = False  # whether a result was written since open()

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
        that determine results), model ``identities`` (from ``ModelPair.identities()``) and
        ``inputs`` (model directories and prompt files; files are identified by their SHA-256).
        ``full_config`` (every field, run-only ones included) goes into ``config.yaml``, which
        ``--config`` replays.

        Refuses (``WeightPatchError``) when the directory lies inside an input path, when it is
        not a run directory but not empty, when another process has it open, when ``command`` was
        run here with another config or other input file contents, or when the models' weights
        differ from the recorded ones. Holds the directory's lock until :meth:`close`."""
        run = cls(path)
        inputs = list(inputs)
        for source in inputs:
            p = Path(source).expanduser()
            if p.exists() and _is_within(run.path, p):
                raise WeightPatchError(
                    f"run directory {run.path} is inside the input {p}; choose a run directory elsewhere"
                )
        if run.path.exists() and not run.path.is_dir():
            raise WeightPatchError(f"run directory {run.path} exists and is not a directory")
        links = sorted(p for p in run.path.iterdir() if p.is_symlink()) if run.path.is_dir() else []
        if links:
            raise WeightPatchError(
                f"run directory {run.path} holds a symbolic link ({links[0].name} -> {os.readlink(links[0])}); "
                f"weightpatch does not write through links out of a run directory: remove the link, or use "
                f"another --run-dir"
            )
        # a directory left by a refused first command holds only its lock and its log (why it stopped)
        leftovers = (LOCK_FILE, LOG_FILE)
        if run.path.is_dir() and run.record() is None and any(p.name not in leftovers for p in run.path.iterdir()):
            raise WeightPatchError(
                f"{run.path} is not empty and is not a weightpatch run directory (no {RUN_FILE}); "
                f"choose a new or empty --run-dir"
            )
        files = input_files(inputs)
        with _writing(run.path):
            run.path.mkdir(parents=True, exist_ok=True)
            run._lock()
        try:
            run._before = run.record()
            previous = run._check_and_record(command, config, models, files, full_config)
            with _writing(run.path):
                run._recover()
            run.start_log()
        except BaseException:
            run._release()  # refused: leave the directory as it was, only let go of it
            raise
        record = run.record() or {}
        run._provenance = provenance(models or record.get("models"), config, anchor_sha256=config.get("anchor_sha256"))
        logger.info("wpatch %s %s", command, "resumed" if previous is not None else "started")
        return run

    def _check_and_record(
        self,
        command: str,
        config: dict[str, Any],
        models: dict[str, Any] | None,
        files: list[dict[str, str]],
        full_config: dict[str, Any] | None,
    ) -> dict[str, Any] | None:
        """Compare with the recorded run (under the lock) and record this command; returns the
        command's previous config (``None`` for a first run)."""
        record = self.record() or {"created": datetime.now(timezone.utc).isoformat(), "commands": {}}
        previous = record["commands"].get(command)
        if previous is not None and previous != config:
            changes = "; ".join(_diff(previous, config))
            raise WeightPatchError(
                f"run directory {self.path} holds a `wpatch {command}` run with a different configuration "
                f"({changes}); use another --run-dir, or delete the directory to start over"
            )
        recorded_files = record.get("inputs", {}).get(command)
        if previous is not None and recorded_files is not None:
            changes = _input_changes(recorded_files, files)
            if changes:
                raise WeightPatchError(
                    f"run directory {self.path} holds a `wpatch {command}` run made from other input files "
                    f"({'; '.join(changes)}); use another --run-dir, or delete the directory to start over"
                )
        if models is not None:
            self._check_models(record.get("models"), models)
            record["models"] = {r: models[r] for r in ("base", "specialized") if r in models}
            record["architecture"] = models.get("architecture")
            record["versions"] = models.get("versions")
        record["commands"][command] = config
        record.setdefault("configs", {})[command] = full_config if full_config is not None else config
        record.setdefault("inputs", {})[command] = files
        self.write_record(record)
        return previous

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
            raise WeightPatchError(f"{f} is corrupt (not valid JSON: {exc}); use another --run-dir") from exc
        except OSError as exc:
            raise WeightPatchError(f"cannot read {f} ({exc.strerror or exc}); fix its permissions") from exc

    def write_record(self, record: dict[str, Any]) -> None:
        with _writing(self.path):
            write_text_atomic(self.path / RUN_FILE, json.dumps(record, indent=2, default=str))
            configs = record.get("configs", record["commands"])
            write_text_atomic(self.path / "config.yaml", yaml.safe_dump(configs, sort_keys=False))

    def update_record(self, **entries: Any) -> None:
        record = self.record() or {"commands": {}}
        record.update(entries)
        self.write_record(record)

    # ---- the lock ----------------------------------------------------------------------------
    def _lock(self) -> None:
        """Take the directory's advisory lock (re-entrant within one process). A lock left by a
        killed process is free: the kernel releases ``flock`` locks when their holder dies."""
        lock_path = self.path / LOCK_FILE
        key = str(lock_path.resolve())
        if key in _held_locks:
            _held_locks[key][1] += 1
            self._lock_key = key
            return
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WeightPatchError(
                f"run directory {self.path} is in use by another wpatch process (pid {holder}); "
                f"wait for it to finish, or use another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held_locks[key] = [fd, 1]
        self._lock_key = key

    def _unlock(self) -> None:
        if self._lock_key is None:
            return
        held = _held_locks[self._lock_key]
        held[1] -= 1
        if held[1] == 0:
            del _held_locks[self._lock_key]
            os.close(held[0])  # releases the flock
        self._lock_key = None

    @property
    def writable(self) -> bool:
        """Whether this object holds the directory's lock (was made by :meth:`open`)."""
        return self._lock_key is not None

    def _recover(self) -> None:
        """After a killed run: remove its temporaries, drop a torn last line of the pending scores
        and fold them into ``scores.parquet``."""
        for p in self.path.iterdir():
            if p.name.startswith(".") and p.name.endswith((TMP_SUFFIX, ".tmp")) and p.is_file():
                p.unlink()
        pending = self.path / PENDING_SCORES
        if pending.is_file():
            data = pending.read_bytes()
            if data and not data.endswith(b"\n"):
                os.truncate(pending, data.rfind(b"\n") + 1)
            self._compact()

    # ---- logging -----------------------------------------------------------------------------
    def start_log(self) -> None:
        if self._handler is not None:
            return
        with _writing(self.path):
            handler = logging.FileHandler(self.path / LOG_FILE)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        self._handler = handler

    def close(self) -> None:
        """Fold pending scores into ``scores.parquet``, stop logging here and release the lock."""
        try:
            if self.writable and (self.path / PENDING_SCORES).is_file():
                with _writing(self.path):
                    self._compact()
        finally:
            self._release()

    def _release(self) -> None:
        """Stop logging here and release the lock."""
        if self._handler is not None:
            logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
        self._unlock()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        """Close; a failed command's log says why it stopped, and after a refusal
        (:class:`WeightPatchError`) that came before any result was written the record is first put
        back as it was, so the refused inputs (prompts, models, settings) are not held against the
        corrected re-run."""
        try:
            if exc is not None:
                self.log_stop(exc)
            if isinstance(exc, WeightPatchError) and self.writable and not self._wrote:
                self._undo_record()
        finally:
            self.close()

    def _undo_record(self) -> None:
        if self._before is not None:
            self.write_record(self._before)
            return
        for name in (RUN_FILE, "config.yaml"):  # a new directory: nothing but its log (why it stopped) and lock
            (self.path / name).unlink(missing_ok=True)

    def log_stop(self, exc: BaseException) -> None:
        """Say in log.txt why the command stopped (only there: the CLI prints its own error line), so a
        directory left by a failed run tells what happened instead of ending on "started"."""
        if self._handler is None:
            return
        if isinstance(exc, KeyboardInterrupt):
            reason = "interrupted; re-run the same command to resume"
        else:
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        self._handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "stopped: %s", (reason,), None))

    # ---- tables ------------------------------------------------------------------------------
    def table_path(self, name: str) -> Path:
        return self.path / f"{name}.parquet"

    def has(self, name: str) -> bool:
        return self.table_path(name).is_file() or (name == "scores" and (self.path / PENDING_SCORES).is_file())

    def save_table(self, name: str, frame: pd.DataFrame) -> Path:
        """Write ``<name>.parquet`` and ``<name>.csv`` atomically (the CSV first: the Parquet file
        is the table, the CSV its readable twin). ``name`` and the frame's columns must be those of
        :data:`weightpatch.tables.TABLES`."""
        check_frame(name, frame)
        path = self.table_path(name)
        self._wrote = True
        with _writing(self.path):
            write_atomic(frame, path.with_suffix(".csv"))
            write_atomic(frame, path, provenance=self._provenance)
        logger.info("wrote %s (%d rows)", path.name, len(frame))
        return path

    def load_table(self, name: str) -> pd.DataFrame | None:
        """The table ``name`` (``None`` if absent); ``scores`` includes the pending rows."""
        if name == "scores":
            return self._scores_frame() if self.has("scores") else None
        path = self.table_path(name)
        return read_table(path) if path.is_file() else None

    def _pending_frame(self) -> pd.DataFrame | None:
        pending = self.path / PENDING_SCORES
        if not pending.is_file():
            return None
        lines = pending.read_bytes().split(b"\n")
        # the last element is b"" after a complete line, or a line torn by a kill (dropped)
        records = []
        for number, line in enumerate(lines[:-1], 1):
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise WeightPatchError(
                    f"{pending} is corrupt at line {number} ({exc}); delete it to recompute those scores"
                ) from exc
        return pd.DataFrame.from_records(records) if records else None

    def _scores_frame(self) -> pd.DataFrame:
        path = self.table_path("scores")
        frames = [read_table(path)] if path.is_file() else []
        pending = self._pending_frame()
        if pending is not None:
            frames.append(pending)
        if not frames:
            return ScoreTable.from_rows([]).frame
        merged = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        return merged.drop_duplicates(SCORE_KEY, keep="last").reset_index(drop=True)

    def _compact(self) -> pd.DataFrame:
        """Fold the pending rows into ``scores.parquet``/``.csv``, then drop them (a kill in
        between leaves rows that are in both, which reading de-duplicates to the same table)."""
        frame = self._scores_frame()
        self.save_table("scores", frame)
        (self.path / PENDING_SCORES).unlink(missing_ok=True)
        return frame

    def scores(self) -> ScoreTable:
        """The full score table (one row per component and method, the latest kept)."""
        if self.writable and (self.path / PENDING_SCORES).is_file():
            with _writing(self.path):
                return ScoreTable(self._compact())
        return ScoreTable(self._scores_frame())

    def append_scores(self, table: ScoreTable) -> ScoreTable:
        """Add rows to ``scores`` (they replace rows with the same component and method). Costs
        one small append, whatever the size of the table; returns ``table``."""
        if not self.writable:
            raise WeightPatchError(f"{self.path} is open read-only; open it with RunDir.open to add scores")
        if not len(table):
            return table
        names = list(table.frame.columns)
        rows = table.frame.to_numpy(dtype=object).tolist()  # Python values; json writes floats round-trip exact
        rows = [[None if v is pd.NA else v for v in r] for r in rows]  # nullable layer/index: null
        lines = "".join(json.dumps(dict(zip(names, r, strict=True))) + "\n" for r in rows).encode()
        self._wrote = True
        with _writing(self.path):
            fd = os.open(self.path / PENDING_SCORES, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                view = memoryview(lines)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        return table

    def done(self, method: str) -> set[str]:
        """Component names already scored with ``method``."""
        f = self.scores().frame
        return set(f.loc[f["method"] == method, "component"])

    @property
    def anchor_stem(self) -> Path:
        return self.path / "anchor"
