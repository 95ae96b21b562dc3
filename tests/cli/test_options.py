"""CLI flags are generated from the config models: every field has a flag, every flag reaches the
config, every default is shown, a run directory's config.yaml replays, and no flag is accepted and
ignored."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import typer
from cli_testutil import invoke
from pydantic_core import PydanticUndefined
from typer.testing import CliRunner

from weightpatch import config
from weightpatch.cli.main import app
from weightpatch.cli.options import add_command, flag_name

COMMANDS = {
    "check": (config.CheckConfig, ("base", "specialized")),
    "anchor": (config.AnchorConfig, ("base", "specialized")),
    "screen": (config.ScreenConfig, ("base", "specialized")),
    "trace": (config.TraceConfig, ("base", "specialized")),
    "merge": (config.MergeStageConfig, ("base", "experts")),
    "report": (config.ReportConfig, ("run_dir",)),
    "demo": (config.DemoConfig, ()),
}
UNUSED = {"check": {"seed"}}  # fields a command has no use for: no flag (add_command's skip)


def click_params(name: str) -> dict[str, object]:
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    return {p.name: p for p in command.params}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_field_has_a_flag_and_nothing_else(name):
    cls, arguments = COMMANDS[name]
    params = click_params(name)
    fields = set(cls.model_fields) - UNUSED.get(name, set())
    assert set(params) == fields | {"config"}
    for field in fields:
        if field in arguments:
            assert params[field].param_type_name == "argument"
        else:
            assert flag_name(field) in params[field].opts


def _value_for(annotation) -> tuple[list[str], object]:
    """CLI words and the expected config value: something other than the default."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType) and len(args) == 1:
        annotation = args[0]
    origin = typing.get_origin(annotation)
    if origin is list:
        inner = typing.get_args(annotation)[0]
        if typing.get_origin(inner) is typing.Literal:
            choices = typing.get_args(inner)
            return [f"{choices[0]},{choices[-1]}"], [choices[0], choices[-1]]
        if inner is float:
            return ["0.25,3"], [0.25, 3.0]
        if inner is int:
            return ["1,3"], [1, 3]
        if inner is Path:
            return ["p1,p2"], [Path("p1"), Path("p2")]
        return ["x1,x2"], ["x1", "x2"]
    if origin is typing.Literal:
        choice = typing.get_args(annotation)[-1]
        return [str(choice)], choice
    if annotation is bool:
        return [], True  # the flag itself
    if annotation is int:
        return ["7"], 7
    if annotation is float:
        return ["0.25"], 0.25
    if annotation is Path:
        return ["some/path"], Path("some/path")
    return ["some-value"], "some-value"


EXCLUSIVE = {"anchor": ("layer",)}  # refused together with --layers (test_config), which is given instead


@pytest.mark.parametrize("name", COMMANDS)
def test_every_flag_reaches_the_config(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "some/path" is a prompt file the command reads before running
    (tmp_path / "some").mkdir()
    (tmp_path / "some" / "path").write_text("a prompt\n")
    cls, arguments = COMMANDS[name]
    seen = []
    probe = typer.Typer()
    add_command(probe, name, cls, seen.append, arguments=arguments, help="probe")
    probe.command("other")(lambda: None)  # a group, so the command is addressed by name as in wpatch
    words: list[str] = [name]
    expected: dict[str, object] = {}
    for field in arguments:
        info = cls.model_fields[field]
        value = ["e1", "e2"] if typing.get_origin(info.annotation) is list else f"{field}-given"
        words += value if isinstance(value, list) else [value]
        expected[field] = Path(value) if info.annotation is Path else value
    for field, info in cls.model_fields.items():
        if field in arguments or field in EXCLUSIVE.get(name, ()):
            continue
        given, value = _value_for(info.annotation)
        if info.annotation is bool and info.default is True:
            words.append(f"--no-{field.replace('_', '-')}")
            value = False
        else:
            words += [flag_name(field), *given]
        expected[field] = value
    result = CliRunner().invoke(probe, words)
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    for field, value in expected.items():
        assert getattr(cfg, field) == value, field


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_every_default(name):
    cls = COMMANDS[name][0]
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for field, info in cls.model_fields.items():
        if field in UNUSED.get(name, set()):
            continue
        default = info.default
        if default is PydanticUndefined or default is None or default == []:
            continue
        shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
        assert f"[default: {shown}]" in text.replace("- ", "-"), (field, shown)


def test_no_flag_is_accepted_and_ignored(llama_pair_dirs, tmp_path):
    for words in (
        ("merge", *llama_pair_dirs, "-o", tmp_path / "m", "--device", "cpu"),
        ("check", *llama_pair_dirs, "--batch-size", "4"),
    ):
        result = invoke(*words)
        assert result.exit_code == 2 and re.search(r"No such option: --(device|batch-size)", result.output), (
            result.output
        )


def test_a_run_directorys_config_yaml_replays_it(llama_pair_dirs, tmp_path):
    run = tmp_path / "run"
    first = invoke("check", *llama_pair_dirs, "--run-dir", run, "--no-progress")
    assert first.exit_code == 0, first.output
    (run / "weight_delta.parquet").unlink()
    replay = invoke("check", "--config", run / "config.yaml")  # models, run dir and flags all from the file
    assert replay.exit_code == 0, replay.output
    assert (run / "weight_delta.parquet").is_file() and "patchable pair" in replay.stdout


def test_version():
    from weightpatch import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"weightpatch {__version__}"
