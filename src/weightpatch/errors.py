"""User-facing errors. Every problem the user can fix raises a :class:`WeightPatchError` whose
message names the problem and the fix; the CLI prints it on one line and exits with code 2.

The one place where errors of third-party readers and writers become user errors: :func:`reading`
(tokenizers, Jinja chat templates, GGUF and safetensors files, pickles, JSON, text encodings, OS
errors) and :func:`writing` (OS errors such as a full disk or a read-only directory, safetensors
write errors). Both name the file; anything they do not recognize is re-raised unchanged (a bug,
shown with its traceback)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class WeightPatchError(Exception):
    """A problem with the user's input (models, prompts, names, run directory), not a bug."""


class PairMismatchError(WeightPatchError):
    """The base and specialized models cannot be patched into each other."""


class UnknownArchitectureError(WeightPatchError):
    """No architecture description covers this model type."""


class ComponentError(WeightPatchError):
    """A component name that does not parse or does not exist in this model."""


class ArchitectureDescriptionError(WeightPatchError):
    """An architecture description file (or its fit to a model) is wrong: names the file, the key
    and the fix."""


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _reading_error(exc: Exception, path: Path, what: str, also: tuple[type[Exception], ...]) -> str | None:
    """The one-line message for ``exc`` raised while reading ``what`` at ``path`` (None: not an
    input problem)."""
    import jinja2.exceptions
    import pydantic
    from safetensors import SafetensorError

    if isinstance(exc, UnicodeDecodeError):
        byte = exc.object[exc.start : exc.start + 1].hex()
        return f"{path}: the {what} is not UTF-8 text (byte 0x{byte} at offset {exc.start}); save it as UTF-8"
    if isinstance(exc, pydantic.ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
        return f"{path}: the {what} is invalid ({problems}); correct those fields or re-save the file"
    if isinstance(exc, json.JSONDecodeError):
        return (
            f"{path}: the {what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            f"fix or regenerate the file"
        )
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return (
            f"{path}: the chat template tried an operation Jinja's sandbox refuses ({_first_line(exc)}); it was not "
            f"run: use a tokenizer whose template you trust, or --prompt-format raw"
        )
    if isinstance(exc, jinja2.exceptions.TemplateError):
        return f"{path}: the chat template fails ({_first_line(exc)}); fix the template, or use --prompt-format raw"
    if isinstance(exc, SafetensorError):
        return f"{path}: a safetensors file is truncated or corrupt ({exc}); re-download or re-save the checkpoint"
    if isinstance(exc, pickle.UnpicklingError):
        reason = next((line for line in str(exc).splitlines() if "unsupported GLOBAL" in line), "")
        return (
            f"{path}: the .bin checkpoint holds Python objects that weights-only loading refuses, because "
            f"unpickling them can run code{f' ({reason.strip()})' if reason else ''}; if you trust its source, "
            "convert it once to safetensors (torch.load(path, weights_only=False), then safetensors.torch.save_file) "
            "and pass that directory"
        )
    if isinstance(exc, struct.error):
        return f"{path}: the {what} is truncated or corrupt ({_first_line(exc)}); re-download or re-convert it"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read {exc.filename or path} ({exc.strerror}); check that the {what} exists and is readable"
    if type(exc) is Exception or isinstance(exc, also):  # the tokenizers library raises bare Exceptions
        fix = "re-download it or re-save it with the library that wrote it"
        return f"{path}: the {what} cannot be loaded ({_first_line(exc)}); {fix}"
    return None


@contextmanager
def reading(path: str | os.PathLike, what: str = "file", also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Turn the errors third-party libraries raise while reading ``what`` (``"tokenizer"``, ``"GGUF
    file"``, ``"prompt file"``, ...) at ``path`` into a one-line :class:`WeightPatchError` that names
    the file and the fix. ``also``: exception types that, at this call site, can only mean a bad
    input (e.g. ``ValueError`` from a config parser). Other errors pass through unchanged."""
    try:
        yield
    except WeightPatchError:
        raise
    except Exception as exc:
        message = _reading_error(exc, Path(path), what, also)
        if message is None:
            raise
        raise WeightPatchError(message) from exc


@contextmanager
def writing(path: str | os.PathLike, option: str = "output location", what: str = "") -> Iterator[None]:
    """Turn an error while writing under ``path`` (a full disk, a read-only or immutable directory,
    a safetensors write error) into a one-line :class:`WeightPatchError`; ``option`` is what the
    user can change instead (``"--run-dir"``, ``"--output"``), ``what`` names ``path`` (``"run
    directory"``)."""
    from safetensors import SafetensorError

    where = f"{what} {path}" if what else str(path)
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # opened with O_NOFOLLOW: a link planted where a file was expected
            fix = f"a symbolic link is in the way ({exc.filename}): remove it, or choose another {option}"
        elif isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = f"fix its permissions or choose another {option}"
        else:
            fix = f"free space or choose another {option}"
        raise WeightPatchError(f"cannot write in {where} ({exc.strerror or exc}); {fix}") from exc
    except SafetensorError as exc:  # its I/O errors (e.g. "No space left on device") arrive wrapped
        raise WeightPatchError(
            f"cannot write in {where} ({_first_line(exc)}); free space or choose another {option}"
        ) from exc
