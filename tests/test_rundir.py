import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import weightpatch
from weightpatch import rundir
from weightpatch.errors import WeightPatchError
from weightpatch.results import ScoreTable
from weightpatch.rundir import LOCK_FILE, PENDING_SCORES, RunDir

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
    assert rundir._held_locks == {}  # a refused open lets go of the directory
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


# ---- run identity by content -------------------------------------------------------------------
def test_prompt_file_rewritten_at_the_same_path_is_refused(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    RunDir.open(tmp_path / "r", "screen", {"top_k": 3}, MODELS, inputs=[prompts]).close()
    RunDir.open(tmp_path / "r", "screen", {"top_k": 3}, MODELS, inputs=[prompts]).close()  # unchanged: resumes
    prompts.write_text('{"prompt": "b"}\n')
    with pytest.raises(WeightPatchError, match=r"other input files \(prompts.jsonl \(sha256 [0-9a-f]{12} -> "):
        RunDir.open(tmp_path / "r", "screen", {"top_k": 3}, MODELS, inputs=[prompts])
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["inputs"]["screen"][0]["path"] == str(prompts.resolve())


def test_same_prompt_file_by_relative_or_absolute_path_resumes(tmp_path, monkeypatch):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n')
    monkeypatch.chdir(tmp_path)
    RunDir.open("r", "screen", {}, MODELS, inputs=["prompts.jsonl"]).close()
    RunDir.open(tmp_path / "r", "screen", {}, MODELS, inputs=[tmp_path / "prompts.jsonl"]).close()
    # a byte-identical copy elsewhere is the same input too
    copy = tmp_path / "elsewhere.jsonl"
    copy.write_bytes((tmp_path / "prompts.jsonl").read_bytes())
    RunDir.open("r", "screen", {}, MODELS, inputs=[copy]).close()
    with pytest.raises(WeightPatchError, match=r"1 input files -> 2"):
        RunDir.open("r", "screen", {}, MODELS, inputs=[copy, copy])


# ---- one-line errors ---------------------------------------------------------------------------
def test_truncated_scores_table_is_a_one_line_error(tmp_path):
    with RunDir.open(tmp_path, "screen", {}, MODELS) as run:
        run.append_scores(_rows(["L0.attn.head0", "L0.attn.head1"]))
    data = (tmp_path / "scores.parquet").read_bytes()
    (tmp_path / "scores.parquet").write_bytes(data[: len(data) // 2])
    run = RunDir.open(tmp_path, "screen", {}, MODELS)  # resuming reads the table: a clear error
    with pytest.raises(WeightPatchError, match=r"scores.parquet is truncated or corrupt .*delete it"):
        run.done("exact")
    run.close()
    with pytest.raises(WeightPatchError, match="truncated or corrupt"):
        RunDir(tmp_path).load_table("scores")
    with pytest.raises(WeightPatchError, match="truncated or corrupt"):
        ScoreTable.load(tmp_path / "scores.parquet")


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a directory that even root cannot write (/sys)")
def test_unwritable_run_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(WeightPatchError, match=r"cannot write in run directory /sys/wpatch-run .*permissions"):
        RunDir.open("/sys/wpatch-run", "screen", {}, MODELS)


def test_write_refused_in_an_existing_run_directory_is_a_one_line_error(tmp_path, monkeypatch):
    run = RunDir.open(tmp_path, "screen", {}, MODELS)

    def refuse(*_args, **_kwargs):
        raise PermissionError(1, "Operation not permitted")  # what an immutable (chattr +i) directory gives

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WeightPatchError, match=r"cannot write in run directory .*Operation not permitted"):
        run.save_table("verified", _verified(1))
    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(WeightPatchError, match="cannot write in run directory"):
        run.append_scores(_rows(["L0.attn.head0"]))
    monkeypatch.undo()
    run.close()


def test_writes_never_follow_a_link_out_of_the_run_directory(tmp_path):
    outside = tmp_path / "input.jsonl"
    outside.write_text("an input\n")
    run_path = tmp_path / "run"
    RunDir.open(run_path, "screen", {}, MODELS).close()
    (run_path / "log.txt").unlink()
    (run_path / "log.txt").symlink_to(outside)
    with pytest.raises(WeightPatchError, match=r"holds a symbolic link \(log.txt -> .*input.jsonl\); .*remove"):
        RunDir.open(run_path, "screen", {}, MODELS)
    (run_path / "log.txt").unlink()
    run = RunDir.open(run_path, "screen", {}, MODELS)
    (run_path / "scores.pending.jsonl").symlink_to(outside)  # planted while the run is open
    with pytest.raises(WeightPatchError, match=r"cannot write in run directory .*symbolic link is in the way"):
        run.append_scores(_rows(["L0.attn.head0"]))
    (run_path / "scores.pending.jsonl").unlink()
    run.close()
    assert outside.read_text() == "an input\n"


def _verified(n: int) -> pd.DataFrame:
    """A ``verified`` table of ``n`` heads (the columns weightpatch.tables asks for)."""
    return pd.DataFrame(
        {"component": [f"L0.attn.head{i}" for i in range(n)], "kind": "head", "layer": 0, "index": range(n)}
    )


# ---- atomic writes -----------------------------------------------------------------------------
def _crash_midway(monkeypatch):
    """Make every table and text write put half of its bytes at the path it is given, then fail."""

    def torn_table(write):
        def crash(frame, path, *args, **kwargs):
            buffer = io.BytesIO()
            write(frame, buffer, *args, **kwargs)
            Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError(28, "No space left on device")

        return crash

    def torn_text(path, text, *args, **kwargs):
        path.write_bytes(text.encode()[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", torn_table(pd.DataFrame.to_parquet))
    monkeypatch.setattr(pd.DataFrame, "to_csv", torn_table(pd.DataFrame.to_csv))
    monkeypatch.setattr(Path, "write_text", torn_text)


def test_a_write_that_fails_midway_leaves_the_previous_files_intact(tmp_path, monkeypatch):
    # Fails if tables or records are written straight to their target: the target would be torn.
    run = RunDir.open(tmp_path, "screen", {}, MODELS)
    run.save_table("verified", _verified(2))
    run.append_scores(_rows(["L0.attn.head0"]))
    run.scores()  # compacts into scores.parquet / scores.csv
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "log.txt"}
    _crash_midway(monkeypatch)
    with pytest.raises(WeightPatchError, match="No space left"):
        run.save_table("verified", _verified(3))
    with pytest.raises(WeightPatchError, match="No space left"):
        run.update_record(note="x" * 1000)
    run.append_scores(_rows(["L0.attn.head1"]))  # appends to the pending rows; compaction then fails
    with pytest.raises(WeightPatchError, match="No space left"):
        run.scores()
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "log.txt"}
    assert {k: v for k, v in after.items() if k != PENDING_SCORES} == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".wptmp"))]
    assert run.done("exact") == {"L0.attn.head0", "L0.attn.head1"}  # nothing lost either
    run.close()


def test_pending_scores_survive_a_kill_and_a_torn_last_line_is_dropped(tmp_path):
    run = RunDir.open(tmp_path, "screen", {}, MODELS)
    run.append_scores(_rows(["L0.attn.head0", "L0.attn.head1"]))
    run.append_scores(_rows(["L0.attn.head2"]))
    pending = (tmp_path / PENDING_SCORES).read_bytes()
    # a process killed inside the write of its next group: part of a line, and a temporary
    (tmp_path / PENDING_SCORES).write_bytes(pending + b'{"component": "L0.attn.he')
    (tmp_path / ".verified.parquet.999-abcd.wptmp").write_bytes(b"half")
    run._unlock()  # the kernel releases a killed process's lock; the object is gone with it
    assert RunDir(tmp_path).scores().components() == ["L0.attn.head0", "L0.attn.head1", "L0.attn.head2"]
    with RunDir.open(tmp_path, "screen", {}, MODELS) as resumed:
        assert not (tmp_path / PENDING_SCORES).exists()  # folded into scores.parquet on opening
        assert not list(tmp_path.glob("*.wptmp")) and not list(tmp_path.glob(".*.wptmp"))
        resumed.append_scores(_rows(["L0.attn.head3"]))
    assert RunDir(tmp_path).done("exact") == {f"L0.attn.head{i}" for i in range(4)}


def test_appended_scores_round_trip_bit_exactly(tmp_path):
    values = [0.1 + 0.2, 1e-300, -0.0, float("nan"), float("inf"), 2.0**-1074]
    rows = ScoreTable.from_rows(
        {"component": f"c{i}", "kind": "head", "layer": 0, "index": i, "method": "exact", "score": v, "stderr": v,
         "n_prompts": 3}
        for i, v in enumerate(values)
    )  # fmt: skip
    with RunDir.open(tmp_path, "screen", {}, MODELS) as run:
        for i in range(len(values)):
            run.append_scores(ScoreTable(rows.frame.iloc[i : i + 1]))
        pending = RunDir(tmp_path).scores().frame  # read from the pending rows
    compacted = RunDir(tmp_path).scores().frame  # read from scores.parquet
    for frame in (pending, compacted):
        assert frame["score"].to_numpy().tobytes() == rows.frame["score"].to_numpy().tobytes()
        assert list(frame.dtypes) == list(rows.frame.dtypes)  # the table schema (nullable layer/index) survives


# ---- the lock ----------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from weightpatch.rundir import RunDir
run = RunDir.open(sys.argv[1], "screen", {}, None)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_process_is_refused_and_a_killed_holder_leaves_the_lock_free(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(weightpatch.__file__).parents[1])}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "r")], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WeightPatchError, match=rf"in use by another wpatch process \(pid {holder.pid}\)"):
            RunDir.open(tmp_path / "r", "screen", {}, None)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "r" / LOCK_FILE).read_text().strip() == str(holder.pid)  # stale lock file left behind
    with RunDir.open(tmp_path / "r", "screen", {}, None):
        assert (tmp_path / "r" / LOCK_FILE).read_text().strip() == str(os.getpid())  # taken over
        with RunDir.open(tmp_path / "r", "anchor", {}, None):  # the same process may reopen it
            pass
    with RunDir.open(tmp_path / "r", "screen", {}, None):
        pass


def test_a_failed_command_says_in_its_log_why_it_stopped(tmp_path):
    with pytest.raises(WeightPatchError), RunDir.open(tmp_path / "r", "screen", {"top_k": 3}, MODELS):
        raise WeightPatchError("component 'L9.mlp' does not exist\n(the model has layers 0..2)")
    last = (tmp_path / "r" / "log.txt").read_text().splitlines()[-1]
    assert last.endswith(
        "ERROR stopped: WeightPatchError: component 'L9.mlp' does not exist (the model has layers 0..2)"
    )
