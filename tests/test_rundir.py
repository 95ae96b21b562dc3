import json

import pandas as pd
import pytest

from weightpatch.errors import WeightPatchError
from weightpatch.results import ScoreTable
from weightpatch.rundir import RunDir

MODELS = {
    "base": {"source": "b", "weights_sha256": "aaa"},
    "specialized": {"source": "s", "weights_sha256": "bbb"},
    "versions": {"torch": "x"},
}


def _rows(names, method="exact", score=0.5):
    return ScoreTable.from_rows(
        {
            "component": n,
            "kind": "head",
            "layer": 0,
            "index": i,
            "method": method,
            "score": score,
            "stderr": 0.0,
            "n_prompts": 3,
        }
        for i, n in enumerate(names)
    )


def test_open_records_config_models_and_log(tmp_path):
    with RunDir.open(tmp_path / "r", "screen", {"top_k": 3}, MODELS):
        pass
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["commands"]["screen"] == {"top_k": 3}
    assert record["models"]["base"]["weights_sha256"] == "aaa" and record["versions"] == {"torch": "x"}
    assert "screen started" in (tmp_path / "r" / "log.txt").read_text()
    assert (tmp_path / "r" / "config.yaml").is_file()


def test_resume_same_config_refuse_other(tmp_path):
    RunDir.open(tmp_path, "screen", {"top_k": 3}, MODELS).close()
    RunDir.open(tmp_path, "anchor", {"layer": 1}, MODELS).close()  # other commands share the directory
    RunDir.open(tmp_path, "screen", {"top_k": 3}, MODELS).close()
    with pytest.raises(WeightPatchError, match=r"different configuration \(top_k: 3 -> 4\)"):
        RunDir.open(tmp_path, "screen", {"top_k": 4}, MODELS)
    changed = {**MODELS, "specialized": {"source": "s2", "weights_sha256": "ccc"}}
    with pytest.raises(WeightPatchError, match="different specialized model"):
        RunDir.open(tmp_path, "screen", {"top_k": 3}, changed)


def test_refuses_foreign_non_empty_directory_and_inputs(tmp_path):
    (tmp_path / "stuff.txt").write_text("mine")
    with pytest.raises(WeightPatchError, match="not a weightpatch run directory"):
        RunDir.open(tmp_path, "screen", {}, MODELS)
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(WeightPatchError, match="inside the input"):
        RunDir.open(model / "run", "screen", {}, MODELS, inputs=[model])
    assert not (model / "run").exists()


def test_scores_append_atomically_and_dedupe(tmp_path):
    run = RunDir.open(tmp_path, "screen", {}, MODELS)
    run.append_scores(_rows(["L0.attn.head0", "L0.attn.head1"]))
    run.append_scores(_rows(["L0.attn.head1", "L0.attn.head2"], score=0.9))
    run.append_scores(_rows(["L0.attn.head0"], method="first_order"))
    frame = run.scores().frame
    assert len(frame) == 4 and run.done("exact") == {"L0.attn.head0", "L0.attn.head1", "L0.attn.head2"}
    assert float(frame.query("component == 'L0.attn.head1' and method == 'exact'")["score"].iloc[0]) == 0.9
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "scores.csv"), frame, check_dtype=False)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    run.close()


def test_corrupt_record_is_a_clear_error(tmp_path):
    (tmp_path / "run.json").write_text("{oops")
    with pytest.raises(WeightPatchError, match="corrupt"):
        RunDir.open(tmp_path, "screen", {}, MODELS)
