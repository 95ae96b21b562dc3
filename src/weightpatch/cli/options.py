"""CLI flags generated from a stage's config model: one option per field (name, type, default and
help from the pydantic field), so the config models in :mod:`weightpatch.config` are the only list of
options. A flag left out is ``None`` and leaves the config file's value (or the field default) in
place; every flag reaches the config, and ``--config FILE`` (a run directory's ``config.yaml``
included) fills the rest."""

from __future__ import annotations

import enum
import inspect
import textwrap
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

PROMPT_FIELDS = ("prompts", "heldout")  # config fields naming a prompt file (read by every stage)
CONFIG_HELP = "YAML file with any of this command's options (a run directory's config.yaml replays it); flags win."


class HelpFormatter(typer.Context.formatter_class):  # click's formatter, as typer bundles it
    """click's layout of options and help, except that a word is never broken inside: a value such as
    ``layer,module,head`` or a flag name stays whole on a narrow terminal (``COLUMNS=60``)."""

    def write_dl(self, rows: Sequence[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
        rows = list(rows)
        first_col = min(max((len(first) for first, _ in rows), default=0), col_max) + col_spacing
        indent = " " * (first_col + self.current_indent)
        for first, second in rows:
            self.write(f"{'':>{self.current_indent}}{first}")
            if not second:
                self.write("\n")
                continue
            self.write(" " * (first_col - len(first)) if len(first) <= first_col - col_spacing else "\n" + indent)
            width = max(self.width - first_col - 2, 10)
            lines = textwrap.wrap(second, width, break_long_words=False, break_on_hyphens=False) or [""]
            self.write(lines[0] + "\n" + "".join(f"{indent}{line}\n" for line in lines[1:]))


class HelpContext(typer.Context):
    formatter_class = HelpFormatter


class Command(typer.core.TyperCommand):
    context_class = HelpContext


class Group(typer.core.TyperGroup):
    context_class = HelpContext


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
    metavar = None
    if is_list:
        py_type: Any = list[str]
        element = name.removesuffix("s") if choices else getattr(inner, "__name__", "str").lower()
        metavar = name if argument else f"<{element},...>"
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
    extra: dict[str, Any] = {"help": help_text, "show_default": False, "metavar": metavar}
    if argument:
        marker = typer.Argument(**extra)
    elif py_type is bool:
        marker = typer.Option(f"{flag_name(name)}/--no-{name.replace('_', '-')}", **extra)
    else:
        marker = typer.Option(flag_name(name), *([short] if short else []), **extra)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[py_type | None, marker]
    )


def check_prompt_files(cfg: BaseModel) -> None:
    """Read the config's prompt files (:data:`PROMPT_FIELDS`) before the stage imports torch or loads a
    model, so a bad file is refused in well under a second; the stage reads them again itself."""
    from weightpatch.prompts import read_prompt_file

    for field in PROMPT_FIELDS:
        path = getattr(cfg, field, None)
        if path is not None:
            read_prompt_file(path)


def add_command(
    app: typer.Typer,
    name: str,
    config_cls: type[BaseModel],
    run: Callable[[Any], None],
    *,
    arguments: Sequence[str] = (),
    short: dict[str, str] | None = None,
    skip: Sequence[str] = (),
    help: str,
    section: str | None = None,
) -> None:
    """Register ``wpatch NAME``: flags from ``config_cls`` (``arguments`` positional, in order), then
    ``run(config)``. ``short``: one-letter aliases (``{"output": "-o"}``). ``skip``: fields the command
    does not use (no flag; their default stays). ``section``: the part of a run directory's
    config.yaml this command replays (default: ``name``)."""
    from weightpatch.cli.common import handle_errors

    fields = config_cls.model_fields
    own = [f for f in config_cls.__annotations__ if f in fields]  # the command's own options first
    options = [f for f in [*own, *fields] if f not in arguments and f not in skip]
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
        cfg = build_config(config_cls, config_file, section or name, **values)
        check_prompt_files(cfg)
        run(cfg)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = help
    command.__name__ = name
    app.command(name, help=help, cls=Command)(handle_errors(command))
