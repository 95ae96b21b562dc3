"""Score tables: one tidy row per (component, method), convertible to pandas, Parquet and CSV.

Columns: ``component`` (name), ``kind``, ``layer`` (-1 for model-level modules), ``index`` (head or
neuron number, -1 otherwise), ``method`` (``exact``, ``first_order``, ``integrated_gradients``,
``activation``, ...), ``score`` (fraction of the anchor gap, see :mod:`weightpatch.scoring`),
``stderr`` (NaN where a method gives none) and ``n_prompts``.

Writing: every file the package writes goes through :func:`atomic_output` (a temporary name in
the target's directory, renamed onto the target), so a reader or a resumed run sees the old file or
the new one, never a torn one. Reading: :func:`read_table` names a truncated or corrupt file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from weightpatch.components import Component
from weightpatch.errors import WeightPatchError

TMP_SUFFIX = ".wptmp"  # temporaries of atomic_output: ".<name>.<pid>-<random>.wptmp"

COLUMNS = ["component", "kind", "layer", "index", "method", "score", "stderr", "n_prompts"]


def score_row(component: Component, method: str, score: float, stderr: float, n_prompts: int) -> dict:
    return {
        "component": component.name,
        "kind": component.kind,
        "layer": -1 if component.layer is None else component.layer,
        "index": -1 if component.index is None else component.index,
        "method": method,
        "score": float(score),
        "stderr": float(stderr),
        "n_prompts": int(n_prompts),
    }


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to: renamed onto ``path`` when the block ends
    without an error (``os.replace``, atomic on POSIX), removed otherwise. A process killed inside
    the block leaves only the temporary (``.<name>.<pid>-<random>.wptmp``), never a torn ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write a table as Parquet or CSV (by suffix) atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        if path.suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a Parquet or CSV table (by suffix); a truncated or corrupt file raises a one-line
    :class:`WeightPatchError` naming it."""
    path = Path(path)
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightPatchError(
            f"{path} is truncated or corrupt ({reason}); delete it to recompute it, or use another --run-dir"
        ) from exc


@dataclass
class ScoreTable:
    frame: pd.DataFrame

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> ScoreTable:
        return cls(pd.DataFrame(list(rows), columns=COLUMNS))

    @classmethod
    def concat(cls, tables: Iterable[ScoreTable]) -> ScoreTable:
        frames = [t.frame for t in tables if len(t.frame)]
        return cls(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScoreTable:
        path = Path(path)
        return cls(read_table(path))

    def __len__(self) -> int:
        return len(self.frame)

    def to_pandas(self) -> pd.DataFrame:
        return self.frame.copy()

    def save(self, stem: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``<stem>.parquet`` and ``<stem>.csv`` atomically."""
        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        paths = stem.with_suffix(".parquet"), stem.with_suffix(".csv")
        for p in paths:
            write_atomic(self.frame, p)
        return paths

    def select(self, method: str | None = None, kind: str | None = None) -> ScoreTable:
        f = self.frame
        if method is not None:
            f = f[f["method"] == method]
        if kind is not None:
            f = f[f["kind"] == kind]
        return ScoreTable(f.reset_index(drop=True))

    def top(self, k: int, method: str | None = None, kind: str | None = None, by_abs: bool = False) -> ScoreTable:
        """The ``k`` highest-scoring rows (by ``|score|`` with ``by_abs``)."""
        f = self.select(method, kind).frame
        key = f["score"].abs() if by_abs else f["score"]
        return ScoreTable(f.loc[key.sort_values(ascending=False).index[:k]].reset_index(drop=True))

    def components(self) -> list[str]:
        return list(dict.fromkeys(self.frame["component"]))

    def side_by_side(self) -> pd.DataFrame:
        """One row per component, one score column per method."""
        wide = self.frame.pivot_table(
            index=["component", "kind", "layer", "index"], columns="method", values="score", aggfunc="first"
        )
        return wide.reset_index().rename_axis(columns=None)

    def by_layer(self, method: str, kind: str, agg: str = "sum") -> pd.Series:
        """Per-layer aggregate of one method's scores for one kind (``sum``, ``max``, ``mean``)."""
        f = self.select(method, kind).frame
        return f.groupby("layer")["score"].agg(agg)

    def by_kind(self, method: str) -> pd.DataFrame:
        f = self.select(method).frame
        return f.groupby("kind")["score"].describe()

    def matrix(self, method: str, kind: str = "head") -> pd.DataFrame:
        """Layer x index matrix of one kind's scores (e.g. the layer x head heatmap)."""
        f = self.select(method, kind).frame
        return f.pivot_table(index="layer", columns="index", values="score", aggfunc="first")
