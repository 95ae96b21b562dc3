"""What every subcommand shares: error handling, terminal manners (progress bars only on a terminal,
paths printed whole), and printing."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from weightpatch.errors import WeightPatchError

out = Console()
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> None:
    """One line on stderr, exit code 2."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(2)


def progress_wanted(requested: bool) -> bool:
    """Progress bars only when asked for and stderr is a terminal. Without them, the bars of
    transformers and the hub client are silenced too."""
    show = requested and sys.stderr.isatty()
    if not show:
        import huggingface_hub.utils
        import transformers

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    return show


class ConsoleLog(logging.Handler):
    """Echoes to stderr the log records marked for the console (``extra=CONSOLE``, e.g. the
    duration estimate of an exact sweep) and every warning (as ``warning: ...``); every record still
    goes to the run's log.txt."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            typer.echo(f"warning: {self.format(record)}", err=True)
        elif getattr(record, "console", False):
            typer.echo(self.format(record), err=True)


@contextlib.contextmanager
def sigint_seen() -> Iterator[list[int]]:
    """Record Ctrl-C (SIGINT) during the block, still raising ``KeyboardInterrupt`` as Python does:
    the list it yields is non-empty once one arrived. Some libraries turn the ``KeyboardInterrupt``
    raised inside them into an error of their own (a safetensors read gives a ``ValueError``); the
    record tells such an error apart from a bug."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield seen  # another thread, or Ctrl-C ignored on purpose (nohup, a background job): leave it so
        return

    def interrupt(signum: int, frame: Any) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted() -> typer.Exit:
    typer.echo("interrupted; re-run the same command to resume", err=True)
    return typer.Exit(130)


def handle_errors(fn: F) -> F:
    """Turn user errors (:class:`WeightPatchError`) into a one-line message and exit code 2, and
    Ctrl-C (however a library reports it) into "interrupted" and exit code 130; with ``--debug``
    let errors raise with a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        logger = logging.getLogger("weightpatch")
        logger.setLevel(logging.DEBUG if debug else logging.INFO)
        console = ConsoleLog(logging.INFO)
        logger.addHandler(console)
        try:
            with sigint_seen() as interrupted:
                return fn(*args, **kwargs)
        except WeightPatchError as exc:
            if debug:
                raise
            fail(str(exc))
        except KeyboardInterrupt:
            raise _interrupted() from None
        except Exception:
            if interrupted and not debug:
                raise _interrupted() from None
            raise
        finally:
            logger.removeHandler(console)

    return wrapper  # type: ignore[return-value]


def echo_path(label: str, path: Path) -> None:
    """``label: path`` on one line, never wrapped or truncated (so it can be copied)."""
    typer.echo(f"{label}: {path}")
