"""Every table a run directory holds: its name, its columns and their dtypes, the stage that writes it.

A table is ``<name>.parquet`` (with a ``.csv`` twin) in the run directory, written by
:meth:`weightpatch.rundir.RunDir.save_table`, which refuses a name not listed here or a frame
missing one of its columns; every Parquet table carries the run's provenance (model, anchor and
config hashes, :data:`weightpatch.results.PROVENANCE_FIELDS`) in its metadata. Tables may have
more columns than listed (``verified`` has one per scoring method, curves a ``kl``/``behavior``
column when asked).

Reading: :class:`weightpatch.runs.Run` (``weightpatch.load_run``) is the one reader; the report, the
merge stage and the CLI summary go through it. One rule for pending rows: the ``scores`` table is
``scores.parquet`` plus the rows appended to ``scores.pending.jsonl`` since it was last compacted
(a killed run leaves them there), the latest row of each (component, method) kept.

Dtypes are pandas names: ``string`` (text; it reads back as pandas' text dtype), ``Int64``
(nullable integer: null for "none"), ``int64``, ``float64``, ``bool``, ``category`` and ``object``
(lists).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from weightpatch.errors import WeightPatchError
from weightpatch.results import DTYPES as SCORE_DTYPES


@dataclass(frozen=True)
class TableSchema:
    """One run table: ``name`` (file stem), the ``stage`` (command) that writes it, its
    ``columns`` (name -> dtype, at least these) and what a row is (``row``)."""

    name: str
    stage: str
    columns: Mapping[str, str]
    row: str


def _schema(name: str, stage: str, row: str, **columns: str) -> TableSchema:
    return TableSchema(name, stage, columns, row)


TABLES: dict[str, TableSchema] = {
    t.name: t
    for t in (
        _schema(
            "weight_delta",
            "check",
            "a (layer, group): relative Frobenius norm of the weight change",
            layer="Int64",
            group="string",
            relative_change="float64",
            delta_norm="float64",
            base_norm="float64",
            parameters="int64",
        ),
        _schema(
            "anchor_layers",
            "anchor",
            "a searched layer: held-out separation of the anchor direction there",
            layer="Int64",
            cohen_d="float64",
            auc="float64",
            accuracy="float64",
            mean_gap="float64",
        ),
        _schema(
            "steering",
            "anchor",
            "a steering strength (and direction): the behaviour metric of the steered base",
            alpha="float64",
            metric="float64",
            direction="string",
            draw="int64",
        ),
        TableSchema("scores", "screen, trace", dict(SCORE_DTYPES), "a (component, method): its score"),
        _schema(
            "verified",
            "screen",
            "a verified component: its score by each method (one column per method)",
            component="string",
            kind="string",
            layer="Int64",
            index="Int64",
        ),
        _schema(
            "roles",
            "trace",
            "a component: activation- and weight-space effect, which is high, its role, the weight method",
            component="string",
            kind="string",
            layer="Int64",
            index="Int64",
            activation="float64",
            weight="float64",
            activation_high="bool",
            weight_high="bool",
            role="category",
            weight_method="string",
        ),
        _schema(
            "supplier_edges",
            "trace",
            "a (target, supplier): the supply score",
            target="string",
            supplier="string",
            supplier_kind="string",
            supplier_layer="Int64",
            target_layer="Int64",
            supply="float64",
            n_prompts="int64",
            method="string",
        ),
        _schema(
            "hierarchy",
            "trace",
            "a component of the traced graph: its hierarchy level",
            component="string",
            level="int64",
            level_name="string",
            layer="Int64",
            traced="bool",
        ),
        _schema(
            "supplier_overlap",
            "trace",
            "a k: overlap of the top-k traced suppliers with the top-k weight scores",
            k="int64",
            fraction="float64",
            shared="object",
        ),
        _schema(
            "sufficiency",
            "trace",
            "a (ranking, k): anchor recovery of the base with the top-k patched in, and random k-subsets",
            k="int64",
            recovery="float64",
            random_mean="float64",
            random_std="float64",
            n_controls="int64",
            components="object",
            ranking="string",
        ),
        _schema(
            "necessity",
            "trace",
            "a (ranking, k): anchor drop of the specialized model with the top-k knocked out, and random k-subsets",
            k="int64",
            drop="float64",
            random_mean="float64",
            random_std="float64",
            n_controls="int64",
            components="object",
            ranking="string",
        ),
        _schema(
            "merge_table",
            "merge",
            "a merged checkpoint: method, mechanism, experts, parameters touched",
            output="string",
            method="string",
            mechanism="string",
            experts="string",
        ),
        _schema(
            "behavior",
            "case study (benchmarks/case_study.py)",
            "a (ranking, k, draw): anchor recovery, KL and strict checker accuracy of the patched base",
            ranking="string",
            k="int64",
            draw="string",
        ),
        _schema(
            "size_fair",
            "case study (benchmarks/case_study.py)",
            "a verified component or head-sized neuron group: exact score per parameter",
            component="string",
            kind="string",
            layer="Int64",
            exact="float64",
            params="int64",
            per_million_params="float64",
        ),
        _schema(
            "responses",
            "screen",
            "a prompt: the specialized model's greedy response the behaviour objective scores",
            prompt="string",
            response_ids="object",
            response="string",
        ),
        _schema(
            "anchor_validity",
            "screen",
            "a patched set (top-k, a random k-subset, or a reference model): anchor and behaviour recovery",
            selection="string",
            draw="int64",
            k="int64",
            kind="string",
            method="string",
            anchor="float64",
            behaviour="float64",
            components="object",
        ),
        _schema(
            "objective_agreement",
            "screen",
            "a kind (layer NaN) or (kind, layer): rank agreement of anchor and behaviour first-order scores",
            kind="string",
            layer="float64",
            n="int64",
            spearman="float64",
            k="int64",
            overlap="int64",
        ),
        _schema(
            "currency_curves",
            "screen",
            "a (ranking, k): the top-k by one objective patched into the base, recovery in both currencies",
            ranking="string",
            k="int64",
            anchor="float64",
            behaviour="float64",
            components="object",
        ),
        _schema(
            "merge_evaluation",
            "merge",
            "a (model, capability): anchor recovery, strict accuracy and KL of the merge and its inputs",
            model="string",
            capability="string",
        ),
    )
}


def schema(name: str) -> TableSchema:
    """The schema of table ``name``; an unlisted name is refused."""
    if name not in TABLES:
        raise WeightPatchError(f"no run table is called {name!r}; the tables are {', '.join(TABLES)}")
    return TABLES[name]


def check_frame(name: str, frame: pd.DataFrame) -> None:
    """Refuse (:class:`WeightPatchError`) a frame for table ``name`` that lacks one of its columns
    (an empty frame with no columns at all is a table with no rows and passes)."""
    if frame.columns.empty:
        return
    missing = [c for c in schema(name).columns if c not in frame.columns]
    if missing:
        raise WeightPatchError(f"table {name} is missing its column(s) {', '.join(missing)} (see weightpatch.tables)")
