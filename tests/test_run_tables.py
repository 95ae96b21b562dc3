"""Run tables (issue 29): one schema module, one reader with one rule for pending rows, a roles table
that records its weight method, a report that reads what the stages write."""

import pandas as pd
import pytest

from weightpatch.components import Component
from weightpatch.errors import WeightPatchError
from weightpatch.pipeline.merge import read_scores
from weightpatch.report import RunData, _roles_with_errors, build_report
from weightpatch.results import ScoreTable, score_row
from weightpatch.roles import assign_roles
from weightpatch.rundir import RunDir
from weightpatch.runs import load_run
from weightpatch.tables import TABLES


def _row(name: str, method: str, score: float, stderr: float = 0.01) -> dict:
    return score_row(Component.parse(name), method, score, stderr, 4)


def test_after_a_kill_every_reader_sees_the_saved_and_the_pending_row(tmp_path):
    run = RunDir.open(tmp_path, "screen", {"x": 1})
    run.append_scores(ScoreTable.from_rows([_row("L0.mlp", "exact", 0.5)]))
    assert len(run.scores()) == 1  # folded into scores.parquet
    run.append_scores(ScoreTable.from_rows([_row("L1.mlp", "exact", 0.25)]))  # pending, then "killed":
    run._release()  # the lock goes with the process; nothing is compacted
    assert (tmp_path / "scores.parquet").is_file() and (tmp_path / "scores.pending.jsonl").is_file()
    expected = {"L0.mlp": 0.5, "L1.mlp": 0.25}
    assert load_run(tmp_path).scores.frame.set_index("component")["score"].to_dict() == expected
    assert RunData(tmp_path)["scores"].set_index("component")["score"].to_dict() == expected
    assert read_scores(tmp_path, "exact").set_index("component")["score"].to_dict() == expected


def test_save_table_refuses_an_unlisted_table_or_a_missing_column(tmp_path):
    with RunDir.open(tmp_path, "trace", {}) as run:
        with pytest.raises(WeightPatchError, match="no run table is called 'interactions'"):
            run.save_table("interactions", pd.DataFrame({"a": [1.0]}))
        edges = pd.DataFrame({"target": ["L1.attn.head0"], "supplier": ["L0.attn.head1"], "supply": [0.3]})
        with pytest.raises(WeightPatchError, match="missing its column"):
            run.save_table("supplier_edges", edges)
        assert not (tmp_path / "supplier_edges.parquet").exists()
        run.save_table("merge_evaluation", pd.DataFrame({"model": ["merged"], "capability": ["caps"], "x": [0.5]}))
    assert set(load_run(tmp_path).tables) == {"merge_evaluation"}


def test_the_report_shows_the_merge_evaluation_the_merge_stage_writes(tmp_path):
    with RunDir.open(tmp_path, "merge:out", {}) as run:
        evaluation = pd.DataFrame(
            {"model": ["merged", "expert"], "capability": ["caps", "caps"], "strict_accuracy": [0.8125, 0.9375]}
        )
        run.save_table("merge_evaluation", evaluation)
    html = build_report(tmp_path).read_text()
    assert "Merge evaluation" in html and ">0.812<" in html and ">0.938<" in html


def test_roles_record_their_weight_method_and_the_report_takes_its_errors_from_it():
    """The weight column equals the first-order scores to the last bit, but the roles were made from
    exact scores: the report's weight errors are the exact ones (no guessing by value)."""
    names = ["L0.mlp", "L1.mlp", "L1.attn"]
    rows = [_row(n, m, s, e) for n, s in zip(names, (0.4, 0.1, 0.3), strict=True) for m, e in (("exact", 0.07),)]
    rows += [_row(n, "first_order", s, 0.5) for n, s in zip(names, (0.4, 0.1, 0.3), strict=True)]
    rows += [_row(n, "activation", 0.2, 0.03) for n in names]
    table = ScoreTable.from_rows(rows)
    roles = assign_roles(table, table, weight_method="exact")
    assert (roles["weight_method"] == "exact").all()
    assert list(TABLES["roles"].columns) == [c for c in roles.columns]
    shown, errors, method = _roles_with_errors(roles, table.frame)
    assert method == "exact" and errors == {"activation": "activation_stderr", "weight": "weight_stderr"}
    assert (shown["weight_stderr"] == 0.07).all()
    legacy = roles.drop(columns="weight_method")
    shown, errors, method = _roles_with_errors(legacy, table.frame)
    assert method == "weight" and "weight" not in errors
