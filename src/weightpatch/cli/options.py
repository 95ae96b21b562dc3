"""CLI flags generated from a stage's config model: one option per field (name, type, default and
help from the pydantic field), so the config models in :mod:`weightpatch.config` are the only list of
options. A flag left out is ``None`` and leaves the config file's value (or the field default) in
place; every flag reaches the config, and ``--config FILE`` (a run directory's ``config.yaml``
included) fills the rest."""

from __future__ import annotations

import enum
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from weightpatch.config import build_config

CONFIG_HELP = "YAML file with any of this command's options (a run directory's config.yaml replays it); flags win."


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``(inner type, is_list)`` of a field annotation, without ``| None``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _shown_default(info: FieldInfo) -> str | None:
    default = info.default
    if default is PydanticUndefined or default is None or default == []:
        return None
    if isinstance(default, list):
        return ",".join(str(v) for v in default)
    return str(default)


def cli_parameter(name: str, info: FieldInfo, argument: bool, short: str | None = None) -> inspect.Parameter:
    """The typer parameter of config field ``name``: typed, with help and the default shown."""
    inner, is_list = _unwrap(info.annotation)
    choices = typing.get_args(inner) if typing.get_origin(inner) is typing.Literal else None
    if is_list:
        py_type: Any = list[str]
    elif choices:  # typer shows and checks the choices of an Enum
        py_type = enum.Enum(f"{name}_choices", {str(c): str(c) for c in choices}, type=str)
    elif inner in (str, Path, bool, int, float):
        py_type = inner
    else:
        py_type = str
    help_text = info.description or ""
    if choices and is_list:
        help_text += f" One or more of: {', '.join(map(str, choices))}."
    shown = _shown_default(info)
    if shown:
        help_text += f" [default: {shown}]"
    extra: dict[str, Any] = {"help": help_text, "show_default": False}
    if argument:
        marker = typer.Argument(**extra)
    elif py_type is bool:
        marker = typer.Option(f"{flag_name(name)}/--no-{name.replace('_', '-')}", **extra)
    else:
        marker = typer.Option(flag_name(name), *([short] if short else []), **extra)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[py_type | None, marker]
    )


def add_command(
    app: typer.Typer,
    name: str,
    config_cls: type[BaseModel],
    run: Callable[[Any], None],
    *,
    arguments: Sequence[str] = (),
    short: dict[str, str] | None = None,
    help: str,
    section: str | None = None,
) -> None:
    """Register ``wpatch NAME``: flags from ``config_cls`` (``arguments`` positional, in order), then
    ``run(config)``. ``short``: one-letter aliases (``{"output": "-o"}``). ``section``: the part of a
    run directory's config.yaml this command replays (default: ``name``)."""
    from weightpatch.cli.common import handle_errors

    fields = config_cls.model_fields
    own = [f for f in config_cls.__annotations__ if f in fields]  # the command's own options first
    options = [f for f in [*own, *fields] if f not in arguments]
    params = [cli_parameter(f, fields[f], argument=True) for f in arguments]
    params += [cli_parameter(f, fields[f], False, (short or {}).get(f)) for f in dict.fromkeys(options)]
    config_marker = typer.Option("--config", help=CONFIG_HELP)
    params.append(
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Path | None, config_marker]
        )
    )

    def command(**flags: Any) -> None:
        config_file = flags.pop("config")
        values = {k: v.value if isinstance(v, enum.Enum) else v for k, v in flags.items()}
        run(build_config(config_cls, config_file, section or name, **values))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = help
    command.__name__ = name
    app.command(name, help=help)(handle_errors(command))
