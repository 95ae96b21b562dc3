"""Hostile and broken inputs (issue 33): each ends in one ``error:`` line and exit code 2 (or the
clean "interrupted" exit 130), never a traceback, a NaN on disk or a silent guess; inputs are
never modified. The walkers at the end cover every subcommand, so a new one inherits the checks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import types
import typing
from pathlib import Path

import pytest
import torch
import typer
from cli_testutil import assert_user_error, invoke, write_prompts
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from conftest import make_pair, tiny_model, tiny_tokenizer, tree_hash
from gguf_writer import write_llama_gguf
from weightpatch import config
from weightpatch.cli.main import app
from weightpatch.cli.options import flag_name
from weightpatch.merging import stream
from weightpatch.weights import SafetensorsSource

UNWRITABLE = Path("/sys")  # a directory that even root cannot write into
NON_UTF8 = b'{"key": 1, "prompt": "caf\xe9", "instruction_id_list": [], "kwargs": []}\n'


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    return make_pair("llama", tmp_path_factory.mktemp("hostile-pair"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("hostile-prompts") / "prompts.jsonl")


@pytest.fixture(scope="module")
def anchored_run(pair_dirs, prompts, tmp_path_factory):
    run = tmp_path_factory.mktemp("hostile-runs") / "anchored"
    result = invoke("anchor", *pair_dirs, "--prompts", prompts, "--run-dir", run, "--steering-prompts", "0")
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def unchanged(pair_dirs, prompts):
    """The pair and the prompt file are byte-identical after the test."""
    before = [tree_hash(d) for d in pair_dirs] + [prompts.read_bytes()]
    yield
    assert [tree_hash(d) for d in pair_dirs] + [prompts.read_bytes()] == before


def _copy_run(run: Path, target: Path) -> Path:
    shutil.copytree(run, target)
    (target / ".wpatch.lock").unlink(missing_ok=True)
    return target


def _with_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _record(key, ids=("punctuation:no_comma",)) -> dict:
    return {
        "key": key,
        "prompt": f"a b c {key} no comma",
        "instruction_id_list": list(ids),
        "kwargs": [{}] * len(ids),
        "prompt_without_instruction": f"a b c {key}",
    }


# ---- 1-5: third-party loading errors -------------------------------------------------------------
def test_chat_template_escaping_the_jinja_sandbox(pair_dirs, prompts, tmp_path, unchanged):
    hostile = []
    for d in pair_dirs:
        copy = shutil.copytree(d, tmp_path / d.name)
        tokenizer_config = json.loads((copy / "tokenizer_config.json").read_text())
        tokenizer_config["chat_template"] = "{{ ().__class__.__init__.__globals__ }}"
        (copy / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        hostile.append(copy)
    result = invoke("anchor", *hostile, "--prompts", prompts, "--run-dir", tmp_path / "run", "--steering-prompts", "0")
    assert_user_error(result, str(hostile[0]), "chat template", "sandbox", "--prompt-format raw")


def test_tokenizer_json_the_tokenizers_library_cannot_load(pair_dirs, tmp_path, unchanged):
    broken = shutil.copytree(pair_dirs[0], tmp_path / "base")
    data = json.loads((broken / "tokenizer.json").read_text())
    data["model"]["merges"] = [["a", "QQ"]]  # a merge naming a token missing from the vocabulary
    (broken / "tokenizer.json").write_text(json.dumps(data))
    assert_user_error(invoke("check", broken, pair_dirs[1]), str(broken), "tokenizer cannot be loaded", "QQ")


def test_gguf_with_absurd_counts(tmp_path):
    good = write_llama_gguf(tiny_model("llama"), tiny_tokenizer(), tmp_path / "good.gguf")
    data = bytearray(good.read_bytes())
    struct.pack_into("<QQ", data, 8, 2**40, 2**40)  # tensor and metadata counts after magic and version
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    result = invoke("check", tmp_path / "bad.gguf", good)
    assert_user_error(result, "bad.gguf: the GGUF file cannot be loaded", "re-download")


def test_lora_adapter_config_with_a_string_rank(pair_dirs, tmp_path, unchanged):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    factors = {f"{prefix}.lora_A.weight": torch.zeros(4, 32), f"{prefix}.lora_B.weight": torch.zeros(32, 4)}
    save_file(factors, str(adapter / "adapter_model.safetensors"))
    settings = {"peft_type": "LORA", "r": "four", "lora_alpha": 8, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    result = invoke("check", pair_dirs[0], adapter)
    assert_user_error(result, "adapter_config.json: the adapter config is invalid", "r:", "integer")


def test_prompt_file_that_is_not_utf8(pair_dirs, tmp_path, unchanged):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(NON_UTF8 * 4)
    result = invoke("anchor", *pair_dirs, "--prompts", bad, "--run-dir", tmp_path / "run")
    assert_user_error(result, str(bad), "not UTF-8", "0xe9", "save it as UTF-8")
    assert not (tmp_path / "run").exists()


# ---- 6-10 ----------------------------------------------------------------------------------------
def test_expert_kinds_on_a_dense_model(pair_dirs, prompts, anchored_run, tmp_path, unchanged):
    run = _copy_run(anchored_run, tmp_path / "run")
    before = tree_hash(run)
    result = invoke("screen", *pair_dirs, "--prompts", prompts, "--run-dir", run, "--kinds", "head,expert")
    assert_user_error(result, "has no expert components", "not a mixture-of-experts", "drop expert from --kinds")
    assert tree_hash(run) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(pair_dirs, unchanged):
    assert_user_error(invoke("check", *pair_dirs, "--device", "cuda"), "device 'cuda' is not available")
    assert_user_error(invoke("check", *pair_dirs, "--device", "gpu"), "unknown device 'gpu'")


def test_full_disk_during_the_merge(pair_dirs, tmp_path, monkeypatch, unchanged):
    def full_disk(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(stream, "save_file", full_disk)
    result = invoke("merge", pair_dirs[0], pair_dirs[1], "-o", tmp_path / "out" / "merged")
    assert_user_error(result, "cannot write in the merge output", "No space left on device", "free space")
    assert list((tmp_path / "out").iterdir()) == []


def test_report_on_a_corrupt_anchor_json(anchored_run, tmp_path):
    run = _copy_run(anchored_run, tmp_path / "run")
    (run / "anchor.json").write_text('{"layer": 1, ')
    assert_user_error(invoke("report", run), "anchor.json", "not valid JSON")


def test_report_into_a_read_only_run_directory(anchored_run, tmp_path, monkeypatch):
    run = _copy_run(anchored_run, tmp_path / "run")

    def read_only(path, text):  # what writing into a read-only directory gives (root ignores chmod)
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("weightpatch.report.write_text_atomic", read_only)
    assert_user_error(invoke("report", run), f"cannot write in {run}", "Permission denied", "--output")


# ---- 11-13: non-finite settings, unknown instruction ids -----------------------------------------
def test_nan_steering_strength_writes_nothing(pair_dirs, prompts, tmp_path, unchanged):
    result = invoke("anchor", *pair_dirs, "--prompts", prompts, "--run-dir", tmp_path / "run", "--alphas", "0,nan")
    assert_user_error(result, "alphas.1: nan is not a finite number")
    assert not (tmp_path / "run").exists()


def test_nan_merge_threshold_and_lam_are_refused(pair_dirs, tmp_path, unchanged):
    for flag in ("--threshold", "--lam"):
        result = invoke("merge", *pair_dirs, "-o", tmp_path / "merged", "--mechanism", "owner_takes_top", flag, "nan")
        assert_user_error(result, f"{flag[2:]}: nan is not a finite number")
    assert not (tmp_path / "merged").exists()


def test_unknown_instruction_id_is_refused_with_the_closest(pair_dirs, tmp_path, unchanged):
    records = [_record(i) for i in range(6)] + [_record(6, ["punctuation:no_comas"])]
    bad = _with_records(tmp_path / "typo.jsonl", records)
    result = invoke("anchor", *pair_dirs, "--prompts", bad, "--run-dir", tmp_path / "run")
    assert_user_error(result, "typo.jsonl:7", "'punctuation:no_comas'", "did you mean 'punctuation:no_comma'")
    assert not (tmp_path / "run").exists()


# ---- 14: silent guesses --------------------------------------------------------------------------
def test_revision_with_local_directories(pair_dirs, tmp_path, unchanged):
    assert_user_error(invoke("check", *pair_dirs, "--revision", "v2"), "--revision 'v2'", "local paths", "drop")
    result = invoke("merge", *pair_dirs, "-o", tmp_path / "m", "--base-revision", "v2")
    assert_user_error(result, "--base-revision 'v2'", "is a local path")


def test_layer_and_layers_together(pair_dirs, prompts, tmp_path):
    result = invoke("anchor", *pair_dirs, "--prompts", prompts, "--layer", "2", "--layers", "1,3")
    assert_user_error(result, "--layer", "--layers", "not both")


def test_repeated_keys_and_repeated_fields_in_prompt_records(pair_dirs, tmp_path, unchanged):
    repeated_key = _with_records(tmp_path / "keys.jsonl", [_record(i % 5) for i in range(8)])
    result = invoke("anchor", *pair_dirs, "--prompts", repeated_key, "--run-dir", tmp_path / "run")
    assert_user_error(result, "keys.jsonl:6", "key 0 is already used at line 1")
    lines = [json.dumps(_record(i)) for i in range(6)]
    lines[2] = lines[2][:-1] + ', "prompt": "another prompt"}'
    repeated_field = tmp_path / "fields.jsonl"
    repeated_field.write_text("\n".join(lines) + "\n")
    result = invoke("anchor", *pair_dirs, "--prompts", repeated_field, "--run-dir", tmp_path / "run")
    assert_user_error(result, "fields.jsonl:3", "field 'prompt' appears twice")
    assert not (tmp_path / "run").exists()


# ---- 15: links out of a run directory ------------------------------------------------------------
def test_run_directory_with_a_log_linked_to_an_input(pair_dirs, prompts, anchored_run, tmp_path, unchanged):
    run = _copy_run(anchored_run, tmp_path / "run")
    (run / "log.txt").unlink()
    (run / "log.txt").symlink_to(prompts)
    result = invoke("anchor", *pair_dirs, "--prompts", prompts, "--run-dir", run, "--steering-prompts", "0")
    assert_user_error(result, "symbolic link (log.txt ->", "remove the link")


# ---- also seen -----------------------------------------------------------------------------------
def test_ctrl_c_that_a_safetensors_read_turns_into_a_value_error(
    pair_dirs, prompts, anchored_run, tmp_path, monkeypatch, unchanged
):
    run = _copy_run(anchored_run, tmp_path / "run")

    def interrupted_read(self, piece):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0)  # let the handler run here
        except KeyboardInterrupt:  # what safetensors' Rust binding makes of it
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
        raise AssertionError("no SIGINT arrived")

    monkeypatch.setattr(SafetensorsSource, "read", interrupted_read)
    args = ("screen", *pair_dirs, "--prompts", prompts, "--run-dir", run, "--method", "exact", "--components", "L1")
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive shell (CI may ignore it)
    try:
        result = invoke(*args)
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    assert result.exit_code == 130, (result.output, result.exception)
    assert "interrupted; re-run the same command to resume" in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert after is signal.default_int_handler  # the CLI put the previous handler back


def test_nan_score_table_is_refused_by_name(pair_dirs, tmp_path, unchanged):
    table = tmp_path / "scores.csv"
    table.write_text("component,method,score\nL0.attn,exact,0.5\nL1.mlp,exact,nan\n")
    args = ("merge", *pair_dirs, "-o", tmp_path / "merged", "--mechanism", "owner_takes_top", "--scores", table)
    assert_user_error(invoke(*args), f"score table {table} holds NaN/inf", "L1.mlp")
    assert not (tmp_path / "merged").exists()


def test_a_refused_nan_model_is_not_recorded_as_the_run_identity(pair_dirs, prompts, tmp_path, unchanged):
    sft = shutil.copytree(pair_dirs[1], tmp_path / "sft")
    state = load_file(str(sft / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"].view(-1)[:3] = float("nan")
    save_file(state, str(sft / "model.safetensors"), metadata={"format": "pt"})
    args = ("anchor", pair_dirs[0], sft, "--prompts", prompts, "--run-dir", tmp_path / "run", "--steering-prompts", "0")
    assert_user_error(invoke(*args), "non-finite weights")
    shutil.copy(pair_dirs[1] / "model.safetensors", sft / "model.safetensors")  # the weights fixed
    result = invoke(*args)
    assert result.exit_code == 0, result.output


def test_inputs_refused_mid_stage_are_not_held_against_the_corrected_rerun(pair_dirs, tmp_path, unchanged):
    records = [_record(i) for i in range(8)]
    records[3]["prompt"] = " ".join(["abc"] * 40)  # beyond the tiny model's context of 64 tokens
    prompts = _with_records(tmp_path / "p.jsonl", records)
    args = ("anchor", *pair_dirs, "--prompts", prompts, "--run-dir", tmp_path / "run", "--steering-prompts", "0")
    assert_user_error(invoke(*args), "longer than the model's context")
    records[3]["prompt"] = "a b c no comma"
    _with_records(prompts, records)
    result = invoke(*args)
    assert result.exit_code == 0, result.output


def test_deleted_anchor_file_is_rebuilt(pair_dirs, prompts, anchored_run, tmp_path, unchanged):
    run = _copy_run(anchored_run, tmp_path / "run")
    (run / "anchor.safetensors").unlink()
    result = invoke("anchor", *pair_dirs, "--prompts", prompts, "--run-dir", run, "--steering-prompts", "0")
    assert result.exit_code == 0, result.output
    rebuilt, original = (load_file(str(r / "anchor.safetensors"))["anchor"] for r in (run, anchored_run))
    assert torch.equal(rebuilt, original)


# ---- every subcommand: NaN options and hostile files ---------------------------------------------
COMMANDS = {
    "check": (config.CheckConfig, ("a", "b")),
    "anchor": (config.AnchorConfig, ("a", "b", "--prompts", "p.jsonl")),
    "screen": (config.ScreenConfig, ("a", "b", "--prompts", "p.jsonl")),
    "trace": (config.TraceConfig, ("a", "b", "--prompts", "p.jsonl")),
    "merge": (config.MergeStageConfig, ("a", "b", "-o", "out")),
    "report": (config.ReportConfig, ("run",)),
    "demo": (config.DemoConfig, ()),
}


def _app_commands() -> set[str]:
    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _float_fields() -> list[tuple[str, str, bool]]:
    """``(command, field, is_list)`` of every float option of every subcommand."""
    found = []
    for name, (cls, _) in COMMANDS.items():
        for field, info in cls.model_fields.items():
            annotation = info.annotation
            if typing.get_origin(annotation) in (typing.Union, types.UnionType):
                annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
            is_list = typing.get_origin(annotation) is list
            if (typing.get_args(annotation)[0] if is_list else annotation) is float:
                found.append((name, field, is_list))
    return found


def test_the_walkers_cover_every_subcommand():
    assert set(COMMANDS) == _app_commands() == set(HOSTILE)
    assert {"alphas", "threshold", "lam", "worker_cpus"} <= {f for _, f, _ in _float_fields()}


@pytest.mark.parametrize(("name", "field", "is_list"), _float_fields(), ids=lambda v: str(v))
def test_nan_and_inf_in_every_float_option_are_refused(name, field, is_list, tmp_path):
    required = COMMANDS[name][1]
    for bad in ("nan", "inf"):
        result = invoke(name, *required, flag_name(field), f"1,{bad}" if is_list else bad, "--run-dir", tmp_path / "r")
        assert_user_error(result, field, f"{bad} is not a finite number")
    assert not (tmp_path / "r").exists()


def _hostile_args(name: str, case: str, pair: tuple[Path, Path], prompts: Path, run: Path, tmp: Path):
    """The arguments of ``wpatch NAME`` with one hostile input, and what its error line must name:
    a non-UTF-8 file (``non_utf8``), an output in a directory even root cannot write
    (``read_only``), or a corrupt JSON side file (``corrupt_json``)."""
    latin1 = tmp / "latin1.jsonl"
    latin1.write_bytes(NON_UTF8 * 8)
    latin1_model = shutil.copytree(pair[1], tmp / "latin1-model")  # for commands that read no prompt file
    (latin1_model / "tokenizer_config.json").write_bytes(b'{"model_max_length": "\xe9"}')
    corrupt_model = shutil.copytree(pair[1], tmp / "corrupt-model")
    (corrupt_model / "config.json").write_text('{"model_type": "llama", ')
    corrupt_run = _copy_run(run, tmp / "corrupt-run")
    (corrupt_run / "run.json").write_text('{"commands": ')
    latin1_run = _copy_run(run, tmp / "latin1-run")
    (latin1_run / "anchor.json").write_bytes(b'{"layer": "\xe9"}')
    readonly = UNWRITABLE / "wpatch-hostile"
    anchor = [] if name == "anchor" else ["--anchor", run / "anchor"]
    unwritable = ("cannot", str(readonly))
    non_utf8 = ("latin1.jsonl: the prompt file is not UTF-8",)
    bad_model = ("corrupt-model", "JSON")
    table: dict[str, dict[str, tuple[list, tuple[str, ...]]]] = {
        "check": {
            "non_utf8": ([pair[0], latin1_model], ("latin1-model: the tokenizer is not UTF-8",)),
            "read_only": ([*pair, "--run-dir", readonly], unwritable),
            "corrupt_json": ([pair[0], corrupt_model], bad_model),
        },
        "demo": {
            "non_utf8": (["--prompts", latin1, "--run-dir", tmp / "run"], non_utf8),
            "read_only": (["--run-dir", readonly], unwritable),
            "corrupt_json": (["--base", pair[0], "--specialized", corrupt_model, "--run-dir", tmp / "run"], bad_model),
        },
        "merge": {
            "non_utf8": ([*pair, "-o", tmp / "merged", "--evaluate-prompts", latin1], non_utf8),
            "read_only": ([*pair, "-o", readonly], ("cannot", str(UNWRITABLE))),
            "corrupt_json": ([pair[0], corrupt_model, "-o", tmp / "merged"], bad_model),
        },
        "report": {
            "non_utf8": ([latin1_run], ("anchor.json: the file is not UTF-8",)),
            "read_only": ([run, "-o", readonly / "report.html"], unwritable),
            "corrupt_json": ([corrupt_run], ("run.json", "JSON")),
        },
    }
    for stage in ("anchor", "screen", "trace"):
        table[stage] = {
            "non_utf8": ([*pair, "--prompts", latin1, "--run-dir", tmp / "run", *anchor], non_utf8),
            "read_only": ([*pair, "--prompts", prompts, "--run-dir", readonly, *anchor], unwritable),
            "corrupt_json": ([*pair, "--prompts", prompts, "--run-dir", corrupt_run], ("run.json", "JSON")),
        }
    return table[name][case]


HOSTILE = {name: ("non_utf8", "read_only", "corrupt_json") for name in COMMANDS}


@pytest.mark.parametrize(("name", "case"), [(n, c) for n, cases in HOSTILE.items() for c in cases])
def test_every_subcommand_refuses_hostile_files_in_one_line(
    name, case, pair_dirs, prompts, anchored_run, tmp_path, unchanged
):
    args, fragments = _hostile_args(name, case, pair_dirs, prompts, anchored_run, tmp_path)
    before = tree_hash(anchored_run)
    assert_user_error(invoke(name, *args), *fragments)
    assert tree_hash(anchored_run) == before


def test_ctrl_c_ignored_on_purpose_stays_ignored():
    """Under nohup or as a background job SIGINT is ignored: the CLI must not turn it back on."""
    from weightpatch.cli.common import sigint_seen

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with sigint_seen() as seen:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)  # ignored: nothing raised, nothing recorded
        assert seen == []
    finally:
        signal.signal(signal.SIGINT, before)
