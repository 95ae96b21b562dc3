"""Score tables: one tidy row per (component, method), convertible to pandas, Parquet and CSV.

Columns (:data:`DTYPES`): ``component`` (name), ``kind`` (``layer``, ``module``, ``head``,
``neuron``), ``component_class`` (finer: ``block``, ``attention``, ``mlp``, ``projection``,
``norm``, ``embedding``, ``unembedding``, ``head``, ``neuron``; see
:attr:`weightpatch.components.Component.component_class`), ``layer`` (nullable ``Int64``: null for
model-level modules), ``index`` (head or neuron number, null otherwise), ``method`` (``exact``,
``first_order``, ``integrated_gradients``, ``activation``, ...), ``score`` (fraction of the anchor
gap, see :mod:`weightpatch.scoring`), ``stderr`` (standard error of that mean across prompts; NaN
where a method gives none) and ``n_prompts``.

Every Parquet file written with a provenance dict (:func:`write_atomic`, :func:`provenance`) carries
it as JSON in the schema metadata under :data:`PROVENANCE_KEY`; :func:`read_provenance` reads it.

Writing: every file the package writes goes through :func:`atomic_output` (a temporary name in
the target's directory, renamed onto the target), so a reader or a resumed run sees the old file or
the new one, never a torn one. Reading: :func:`read_table` names a truncated or corrupt file.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from weightpatch.components import Component
from weightpatch.errors import WeightPatchError

TMP_SUFFIX = ".wptmp"  # temporaries of atomic_output: ".<name>.<pid>-<random>.wptmp"

COLUMNS = ["component", "kind", "component_class", "layer", "index", "method", "score", "stderr", "n_prompts"]
DTYPES = {
    "component": "string",
    "kind": "string",
    "component_class": "string",
    "layer": "Int64",
    "index": "Int64",
    "method": "string",
    "score": "float64",
    "stderr": "float64",
    "n_prompts": "int64",
}
NULLABLE_INT = ("layer", "index")  # "none" is a null, never -1
PROVENANCE_KEY = b"weightpatch.provenance"
PROVENANCE_FIELDS = (
    "base_sha256",
    "specialized_sha256",
    "anchor_sha256",
    "config_sha256",
    "weightpatch_version",
)


def score_row(component: Component, method: str, score: float, stderr: float, n_prompts: int) -> dict:
    return {
        "component": component.name,
        "kind": component.kind,
        "component_class": component.component_class,
        "layer": component.layer,
        "index": component.index,
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


def nullable_ints(frame: pd.DataFrame, columns: Iterable[str] = NULLABLE_INT) -> pd.DataFrame:
    """``frame`` with the given integer columns as nullable ``Int64``, the legacy ``-1`` ("none") of
    tables written before 0.2 read as null. Columns absent from ``frame`` are ignored."""
    out = frame
    for c in columns:
        if c in out.columns and out[c].dtype != "Int64":
            values = pd.to_numeric(out[c], errors="coerce").astype("Int64")
            out = out.assign(**{c: values.mask(values == -1)})
    return out


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """A score frame with the :data:`DTYPES` column types (``component_class`` filled in from the
    names when missing, legacy ``-1`` layers/indices as nulls)."""
    frame = nullable_ints(frame)
    if "component" in frame.columns:
        if "component_class" not in frame.columns:
            position = list(frame.columns).index("kind") + 1 if "kind" in frame.columns else len(frame.columns)
            frame = frame.copy()
            frame.insert(position, "component_class", pd.Series(pd.NA, index=frame.index, dtype="string"))
        missing = frame["component_class"].isna()
        if missing.any():
            classes = [Component.parse(n).component_class for n in frame.loc[missing, "component"]]
            frame = frame.astype({"component_class": "string"})
            frame.loc[missing, "component_class"] = classes
    wrong = {c: t for c, t in DTYPES.items() if c in frame.columns and str(frame[c].dtype) != t}
    return frame.astype(wrong) if wrong else frame


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of a resolved config as canonical JSON (sorted keys, values via ``str`` when not JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def provenance(
    models: dict[str, Any] | None, config: dict[str, Any] | None, anchor_sha256: str | None = None
) -> dict[str, str | None]:
    """The provenance recorded in a table's metadata: the weights' sha256 of each model (from
    ``ModelPair.identities()`` or a run record's ``models``), the anchor files' sha256, the sha256 of
    the resolved config (:func:`config_sha256`) and the weightpatch version. Missing parts are None."""
    from weightpatch import __version__

    models = models or {}
    return {
        "base_sha256": (models.get("base") or {}).get("weights_sha256"),
        "specialized_sha256": (models.get("specialized") or {}).get("weights_sha256"),
        "anchor_sha256": anchor_sha256,
        "config_sha256": config_sha256(config) if config is not None else None,
        "weightpatch_version": __version__,
    }


def to_arrow(frame: pd.DataFrame, provenance: dict[str, Any] | None = None) -> pa.Table:
    """``frame`` as an Arrow table (no index) with ``provenance`` as JSON in the schema metadata
    under :data:`PROVENANCE_KEY` (pandas' own metadata kept, so dtypes round-trip)."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if provenance is not None:
        meta = dict(table.schema.metadata or {})
        meta[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
    return table


def read_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance dict stored in a Parquet file's schema metadata, or None when it has none."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw is not None else None


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A result table (Parquet or CSV by suffix) with nullable ``layer``/``index`` (legacy ``-1`` as
    null); a truncated or corrupt file raises a one-line :class:`WeightPatchError` naming it."""
    path = Path(path)
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightPatchError(
            f"{path} is truncated or corrupt ({reason}); delete it to recompute it, or use another --run-dir"
        ) from exc
    return nullable_ints(frame)


def write_atomic(frame: pd.DataFrame, path: Path, provenance: dict[str, Any] | None = None) -> None:
    """Write a table as Parquet (with ``provenance`` in its schema metadata) or CSV (by suffix)
    atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        if path.suffix == ".parquet":
            pq.write_table(to_arrow(frame, provenance), tmp)
        else:
            frame.to_csv(tmp, index=False)


@dataclass
class ScoreTable:
    """A long score table (:data:`COLUMNS`); the frame is brought to :data:`DTYPES` on construction."""

    frame: pd.DataFrame

    def __post_init__(self) -> None:
        self.frame = _typed(self.frame)

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> ScoreTable:
        return cls(pd.DataFrame(list(rows), columns=COLUMNS))

    @classmethod
    def concat(cls, tables: Iterable[ScoreTable]) -> ScoreTable:
        frames = [t.frame for t in tables if len(t.frame)]
        return cls(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScoreTable:
        """Read a table written by :meth:`save`: give the same stem (``runs/scores``, read from
        ``runs/scores.parquet``) or a ``.parquet``/``.csv`` file; a missing one is a one-line error."""
        path = Path(path)
        if path.suffix not in (".parquet", ".csv"):
            path = path.with_name(path.name + ".parquet")
        if not path.is_file():
            raise WeightPatchError(f"no score table at {path}; pass the stem given to ScoreTable.save or the file")
        return cls(read_table(path))

    def __len__(self) -> int:
        return len(self.frame)

    def _facts(self) -> dict[str, str]:
        counts = self.frame["method"].value_counts(sort=False)
        return {
            "rows": str(len(self)),
            "methods": ", ".join(f"{m} ({n})" for m, n in counts.items()) or "none",
            "kinds": ", ".join(dict.fromkeys(self.frame["kind"])) or "none",
        }

    def __repr__(self) -> str:
        from weightpatch.display import facts_text

        return f"ScoreTable({facts_text(self._facts())})"

    def _repr_html_(self) -> str:
        """The counts and the ten strongest components of the first method (by ``|score|``), with the
        other methods' scores beside them."""
        from weightpatch.display import html_card

        if not len(self):
            return html_card("ScoreTable", self._facts())
        first = str(self.frame["method"].iloc[0])
        wide = self.side_by_side().set_index("component")
        top = self.top(10, method=first).components()
        shown = wide.loc[top, [c for c in wide.columns if c in ("kind", *self.frame["method"].unique())]]
        return html_card(f"ScoreTable (top 10 by |{first}|)", self._facts(), shown.reset_index())

    def to_pandas(self) -> pd.DataFrame:
        return self.frame.copy()

    def save(self, stem: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``<stem>.parquet`` and ``<stem>.csv`` atomically (:meth:`load` reads the same stem)."""
        stem = Path(stem)
        stem = stem.with_suffix("") if stem.suffix in (".parquet", ".csv") else stem
        stem.parent.mkdir(parents=True, exist_ok=True)
        paths = stem.with_name(stem.name + ".parquet"), stem.with_name(stem.name + ".csv")
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

    def top(self, k: int, method: str | None = None, kind: str | None = None, by_abs: bool = True) -> ScoreTable:
        """The ``k`` rows with the largest ``|score|`` (the largest signed score with ``by_abs=False``),
        as the CLI summary and :func:`~weightpatch.screening.verify.screen_then_verify` rank. A table
        holding several methods needs ``method``: their scores are not one ranking."""
        f = self.select(method, kind).frame
        methods = list(dict.fromkeys(f["method"]))
        if method is None and len(methods) > 1:
            raise WeightPatchError(
                f"the table holds scores of {len(methods)} methods ({', '.join(methods)}); pass method= to rank one"
            )
        key = f["score"].abs() if by_abs else f["score"]
        return ScoreTable(f.loc[key.sort_values(ascending=False, kind="stable").index[:k]].reset_index(drop=True))

    def components(self) -> list[str]:
        return list(dict.fromkeys(self.frame["component"]))

    def side_by_side(self) -> pd.DataFrame:
        """One row per component (in first-seen order): ``component, kind, component_class, layer,
        index``, one score column per method and its standard error as ``<method>_stderr``."""
        f = self.frame
        ids = [c for c in ("component", "kind", "component_class", "layer", "index") if c in f.columns]
        keys = f[ids].drop_duplicates("component").set_index("component")
        methods = list(dict.fromkeys(f["method"]))
        scores = f.pivot_table(index="component", columns="method", values="score", aggfunc="first")
        errors = f.pivot_table(index="component", columns="method", values="stderr", aggfunc="first", dropna=False)
        wide = keys.join(scores.reindex(columns=methods))
        wide = wide.join(errors.reindex(columns=methods).add_suffix("_stderr"))
        return wide.reset_index().rename_axis(columns=None)

    def by_layer(self, method: str, kind: str, agg: str = "sum") -> pd.Series:
        """Per-layer aggregate of one method's scores for one kind (``sum``, ``max``, ``mean``)."""
        f = self.select(method, kind).frame
        return f.groupby("layer")["score"].agg(agg)

    def by_kind(self, method: str) -> pd.DataFrame:
        f = self.select(method).frame
        return f.groupby("kind")["score"].describe()

    def heatmap(self, method: str, vmax: float | None = None) -> Any:
        """The report's layer x head map of ``method``'s head scores (a matplotlib Figure; in a
        notebook it displays inline): :func:`weightpatch.figures.head_heatmap`."""
        from weightpatch.figures import head_heatmap

        return head_heatmap(self, method, vmax)

    def matrix(self, method: str, kind: str = "head", num_layers: int | None = None) -> pd.DataFrame:
        """Layer x index matrix of one kind's scores (e.g. the layer x head heatmap): one row per layer
        ``0..num_layers-1`` (default: up to the highest layer anywhere in the table), NaN where a layer
        or an index has no score (a layer with no verified head is a NaN row, not a missing one)."""
        f = self.select(method, kind).frame
        wide = f.pivot_table(index="layer", columns="index", values="score", aggfunc="first")
        layers = self.frame["layer"].dropna()
        n = num_layers if num_layers is not None else (int(layers.max()) + 1 if len(layers) else 0)
        columns = range(int(f["index"].max()) + 1) if f["index"].notna().any() else []
        wide = wide.reindex(index=pd.Index(range(n), name="layer"), columns=pd.Index(columns, name="index"))
        return wide.astype("float64")
