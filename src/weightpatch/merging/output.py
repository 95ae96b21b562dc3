"""The merged directory as a product: one writer per target, leftovers of killed runs cleaned up,
ordinary permissions, and a model card.

A merge to ``DIR`` writes into a hidden sibling ``.DIR.tmp-XXXX`` and renames it into place (see
:mod:`weightpatch.merging.stream`). While it runs it holds an advisory lock (``flock``) on
``.DIR.lock``, so a second merge to the same target is refused, and any ``.DIR.tmp-*`` found while
holding the lock belongs to a run that died (SIGKILL, power loss, Ctrl-C): the new run either
resumes from it (same recipe: same inputs by content, same merge) or removes it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml

from weightpatch.errors import WeightPatchError

logger = logging.getLogger("weightpatch")

RECIPE_FILE = ".weightpatch-recipe.json"  # inside a temporary output: the fingerprint it was written for
CARD_NAME = "README.md"
_CARD_SCORES_SHOWN = 25  # components listed per expert in the model card (all of them are in the record)


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_normal_modes(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir`` / ``open`` would:
    directories ``0o777 & ~umask`` (0755), files ``0o666 & ~umask`` (0644). ``mkdtemp`` creates
    0700 and ``copy2`` copies the source's mode, neither of which a published model should keep."""
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def temporary_outputs(target: Path) -> list[Path]:
    """Leftovers of earlier merges to ``target``: ``.NAME.tmp-*`` (unfinished outputs) and
    ``.NAME.old-*`` (a previous output being replaced when the run died), oldest first."""
    if not target.parent.is_dir():
        return []
    found = [p for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*") for p in target.parent.glob(pattern)]
    return sorted((p for p in found if p.is_dir() and not p.is_symlink()), key=lambda p: p.stat().st_mtime)


def read_recipe(tmp: Path) -> str | None:
    """The recipe fingerprint a temporary output was written for (None if unreadable)."""
    try:
        return str(json.loads((tmp / RECIPE_FILE).read_text())["recipe_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_leftover(path: Path) -> None:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    shutil.rmtree(path, ignore_errors=True)
    logger.warning("removed %s (%.1f MB) left by an earlier merge that did not finish", path, size / 1e6)


@contextmanager
def target_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``.NAME.lock`` beside ``target`` for the block; refuse
    (one-line error naming the holder's PID) when another process holds it. The lock dies with its
    process (SIGKILL included), and the lock file is removed on exit."""
    path = target.parent / f".{target.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise WeightPatchError(
                f"cannot create {path} ({exc.strerror}); choose a writable output location"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise WeightPatchError(
                    f"another merge (PID {holder}) is writing {target}; wait for it to finish or choose another output"
                ) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file the previous holder unlinked after we opened it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def model_card(record: dict[str, Any]) -> str:
    """A README.md for a merged directory from its ``weightpatch_merge.json`` record: the recipe,
    every input with the SHA-256 of its weight files, the component scores the merge used, and the
    checks the inputs passed. Contains nothing that varies between runs of the same merge."""
    base = record["base"]
    lines = [
        "---",
        yaml.safe_dump(
            {"base_model": base["source"], "library_name": "transformers", "tags": ["merge", "weightpatch"]}
        ).strip(),
        "---",
        "",
        "# Merged model",
        "",
        f"Written by weightpatch {record['weightpatch_version']} (`merge_checkpoints`): "
        f"{len(record['experts'])} expert(s) merged onto the base. Recipe fingerprint "
        f"`{record['recipe_sha256']}` (SHA-256 of the inputs' weight hashes and the merge settings).",
        "",
        "## Inputs",
        "",
        "| role | model | weights SHA-256 |",
        "|---|---|---|",
        f"| base | `{base['source']}` | `{base['weights_sha256']}` |",
    ]
    for i, expert in enumerate(record["experts"]):
        lines.append(f"| expert {i} | `{expert['source']}` | `{expert['weights_sha256']}` |")
    merge = record["merge"]
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(_without_scores(merge), sort_keys=False).strip(), "```"]
    lines += ["", "## Scores used", ""]
    scores = merge.get("scores_used") if isinstance(merge, dict) else None
    if not scores:
        lines.append("None: a standard merge uses no component scores.")
    else:
        lines.append(
            "Each expert's components that set its merge coefficients, with the raw Weight Patching score and the "
            "score normalized by the expert's best one."
        )
        for i, rows in enumerate(scores):
            lines += [
                "",
                f"Expert {i} ({len(rows)} components):",
                "",
                "| component | score | normalized |",
                "|---|---|---|",
            ]
            lines += [
                f"| {r['component']} | {r['score']:.6g} | {r['normalized']:.4f} |" for r in rows[:_CARD_SCORES_SHOWN]
            ]
            if len(rows) > _CARD_SCORES_SHOWN:
                lines.append(f"| ... {len(rows) - _CARD_SCORES_SHOWN} more in weightpatch_merge.json | | |")
    checks = record["checks"]
    lines += [
        "",
        "## Checks",
        "",
        "- every expert has the base's tensor names, shapes, model type and architecture",
        f"- tokenizer vocabulary equal to the base's: {checks['vocabulary']}",
        "- every input tensor and every merged tensor is finite (no NaN or inf)",
        f"- custom code in the base: {checks['custom_code']}",
        "",
    ]
    return "\n".join(lines)


def _without_scores(merge: Any) -> Any:
    if isinstance(merge, dict):
        return {k: v for k, v in merge.items() if k not in ("scores_used", "selected_components")}
    return merge


def describe_vocabulary(checked: Sequence[bool]) -> str:
    """The model card's vocabulary line: which experts were compared (an expert without tokenizer
    files uses the base's, so there is nothing to compare)."""
    if all(checked):
        return "checked for every expert"
    if not any(checked):
        return "not checked (no tokenizer files in the base or the experts)"
    missing = ", ".join(str(i) for i, c in enumerate(checked) if not c)
    return f"checked, except expert(s) {missing} (no tokenizer files)"
