"""Prompt sets in IFEval's JSONL schema.

One JSON object per line with IFEval's fields:

- ``key`` (int; a string is accepted too),
- ``prompt`` (str),
- ``instruction_id_list`` (list of str),
- ``kwargs`` (list of dicts, one per instruction, IFEval's argument names, e.g.
  ``{"num_highlights": 2}`` or ``{"section_spliter": "SECTION", "num_sections": 3}``).

weightpatch extension (optional, never required): ``prompt_without_instruction`` (str), the same
request with its instruction sentences removed, used to build instruction-vector anchors. Other
extra fields are kept in :attr:`PromptRecord.extra`. Blank lines are skipped.

Refused, naming the file and line: text that is not UTF-8, a JSON object with a repeated field
name (which of the two values was meant?), a ``key`` used by two records (keys identify prompts in
results) and an instruction id that is not one of IFEval's (:data:`IFEVAL_INSTRUCTIONS`, the ids
of lm-eval's ``instructions_registry``; the closest one is suggested), which no checker could score.

:func:`read_prompt_file` reads any prompt file a stage accepts, recognised by its content (not its
name): IFEval JSONL, a CSV/TSV table with a ``prompt`` column, or plain text with one prompt per line.
It needs no model and imports nothing heavy, so ``wpatch`` checks prompt files before loading one.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightpatch.errors import WeightPatchError, reading

REQUIRED_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")
MIN_PROMPTS = 8  # below this a stage warns: separations and mean scores from fewer are not reliable
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}

#: Every IFEval instruction id (lm-eval's ``INSTRUCTION_DICT``); the builtin checkers (checkers.CHECKERS) cover seven.
IFEVAL_INSTRUCTIONS: frozenset[str] = frozenset(
    {
        *("keywords:existence", "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency"),
        "language:response_language",
        *("length_constraints:number_sentences", "length_constraints:number_paragraphs"),
        *("length_constraints:number_words", "length_constraints:nth_paragraph_first_word"),
        *("detectable_content:number_placeholders", "detectable_content:postscript"),
        *("detectable_format:number_bullet_lists", "detectable_format:constrained_response"),
        *("detectable_format:number_highlighted_sections", "detectable_format:multiple_sections"),
        *("detectable_format:json_format", "detectable_format:title"),
        *("combination:two_responses", "combination:repeat_prompt"),
        *("startend:end_checker", "startend:quotation"),
        *("change_case:capital_word_frequency", "change_case:english_capital", "change_case:english_lowercase"),
        "punctuation:no_comma",
    }
)


@dataclass
class PromptRecord:
    """One IFEval prompt (plus the optional instruction-free form)."""

    key: int | str
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]
    prompt_without_instruction: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "key": self.key,
            "prompt": self.prompt,
            "instruction_id_list": list(self.instruction_id_list),
            "kwargs": [dict(k) for k in self.kwargs],
        }
        if self.prompt_without_instruction is not None:
            d["prompt_without_instruction"] = self.prompt_without_instruction
        d.update(self.extra)
        return d


def _fail(path: Path, lineno: int, message: str) -> WeightPatchError:
    return WeightPatchError(f"{path}:{lineno}: {message}")


def parse_record(obj: Any, path: Path | str = "<memory>", lineno: int = 0) -> PromptRecord:
    """Validate one decoded JSON object; errors name the file, line and field."""
    path = Path(path)
    if not isinstance(obj, dict):
        raise _fail(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in obj:
            needed = ", ".join(REQUIRED_FIELDS)
            raise _fail(path, lineno, f"missing field {name!r} (the IFEval schema needs {needed})")
    key = obj["key"]
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise _fail(path, lineno, f"field 'key' must be an integer or a string, got {type(key).__name__}")
    if not isinstance(obj["prompt"], str):
        raise _fail(path, lineno, f"field 'prompt' must be a string, got {type(obj['prompt']).__name__}")
    ids = obj["instruction_id_list"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise _fail(path, lineno, "field 'instruction_id_list' must be a list of strings")
    for unknown in [i for i in ids if i not in IFEVAL_INSTRUCTIONS]:
        close = difflib.get_close_matches(unknown, sorted(IFEVAL_INSTRUCTIONS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"known ids: {', '.join(sorted(IFEVAL_INSTRUCTIONS))}"
        raise _fail(path, lineno, f"unknown IFEval instruction id {unknown!r}; {hint}")
    kwargs = obj["kwargs"]
    if not isinstance(kwargs, list) or not all(isinstance(k, dict) for k in kwargs):
        raise _fail(path, lineno, "field 'kwargs' must be a list of objects (one per instruction)")
    if len(kwargs) != len(ids):
        raise _fail(
            path,
            lineno,
            f"field 'kwargs' has {len(kwargs)} entries but 'instruction_id_list' has {len(ids)}",
        )
    without = obj.get("prompt_without_instruction")
    if without is not None and not isinstance(without, str):
        raise _fail(path, lineno, "field 'prompt_without_instruction' must be a string when present")
    extra = {k: v for k, v in obj.items() if k not in (*REQUIRED_FIELDS, "prompt_without_instruction")}
    return PromptRecord(
        key=key,
        prompt=obj["prompt"],
        instruction_id_list=list(ids),
        kwargs=[dict(k) for k in kwargs],
        prompt_without_instruction=without,
        extra=extra,
    )


class _RepeatedField(ValueError):
    """A JSON object names one field twice (``json`` keeps the last silently)."""


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of the prompt reader: refuses a field named twice in one object."""
    obj: dict[str, Any] = {}
    for name, value in pairs:
        if name in obj:
            raise _RepeatedField(name)
        obj[name] = value
    return obj


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """Read an IFEval-schema JSONL file (e.g. IFEval's ``input_data.jsonl``).

    Raises :class:`~weightpatch.errors.WeightPatchError` naming the file, the line and the field for
    a missing file, invalid JSON, a missing field or a wrong type, and for a file with no records.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightPatchError(f"{path}: prompt file not found")
    with reading(path, "prompt file"):
        text = path.read_text(encoding="utf-8")
    records = []
    first_line: dict[int | str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_unique_fields)
        except json.JSONDecodeError as e:
            raise _fail(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
        except _RepeatedField as e:
            raise _fail(path, lineno, f"field {e.args[0]!r} appears twice in one object; keep one") from None
        record = parse_record(obj, path, lineno)
        if record.key in first_line:
            raise _fail(
                path,
                lineno,
                f"key {record.key!r} is already used at line {first_line[record.key]}; keys must be unique",
            )
        first_line[record.key] = lineno
        records.append(record)
    if not records:
        raise WeightPatchError(f"{path}: no prompts (the file is empty); expected one JSON object per line")
    return records


def save_prompts(records: list[PromptRecord], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict()) + "\n")
    return path


def without_instruction(records: list[PromptRecord]) -> list[PromptRecord]:
    """The paired instruction-free prompts (no instructions); needs ``prompt_without_instruction``."""
    out = []
    for r in records:
        if r.prompt_without_instruction is None:
            raise WeightPatchError(
                f"prompt {r.key!r} has no 'prompt_without_instruction' field: the instruction-vector anchor "
                "contrasts each prompt with the same request without its instruction (a weightpatch extension "
                "of the IFEval schema); add that field, or use --method model_diff, which needs only the prompts"
            )
        out.append(PromptRecord(key=r.key, prompt=r.prompt_without_instruction, instruction_id_list=[], kwargs=[]))
    return out


def _table_records(path: Path, text: str, delimiter: str) -> list[PromptRecord]:
    """Records of a CSV/TSV table with a ``prompt`` column (``key`` and ``prompt_without_instruction``
    used when present, other columns kept in ``extra``)."""
    rows = list(csv.DictReader(io.StringIO(text), delimiter=delimiter))
    header = [str(h).strip() for h in (rows[0].keys() if rows else next(csv.reader(io.StringIO(text))))]
    if "prompt" not in header:
        raise WeightPatchError(
            f"{path}: a {'CSV' if delimiter == ',' else 'TSV'} prompt file needs a 'prompt' column (its header is: "
            f"{', '.join(header) or 'empty'}); name the prompt column 'prompt', or write one prompt per line in a "
            f".txt file"
        )
    records = []
    for i, raw in enumerate(rows):
        row = {str(k).strip(): v for k, v in raw.items() if k is not None}
        prompt = (row.pop("prompt") or "").strip()
        if not prompt:
            continue
        without = (row.pop("prompt_without_instruction", None) or "").strip() or None
        key = row.pop("key", None) or i
        records.append(PromptRecord(key, prompt, [], [], prompt_without_instruction=without, extra=row))
    return records


def detect_prompt_format(path: Path, text: str) -> str:
    """``jsonl``, ``csv``, ``tsv`` or ``text``: what a prompt file holds, by its content (a first
    line that is a JSON object, a header with a ``prompt`` column) and, for tables, its suffix."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if first.startswith("{") or path.suffix in (".jsonl", ".json"):
        return "jsonl"
    if path.suffix in TABLE_SUFFIXES:
        return path.suffix[1:]
    for name, delimiter in TABLE_SUFFIXES.items():
        header = [h.strip().lower() for h in next(csv.reader([first], delimiter=delimiter), [])]
        if "prompt" in header:
            return name[1:]
    return "text"


def read_prompt_file(path: str | Path) -> list[PromptRecord]:
    """Prompt records of a prompt file, recognised by content (:func:`detect_prompt_format`): IFEval
    JSONL (:func:`load_prompts`), a CSV/TSV table with a ``prompt`` column (a header line is never read
    as a prompt), or plain text with one prompt per line (blank lines skipped). Refuses a missing,
    binary or empty file and a table without a ``prompt`` column, naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise WeightPatchError(f"{path}: prompt file not found")
    with reading(path, "prompt file"):
        text = path.read_text(encoding="utf-8")
    kind = detect_prompt_format(path, text)
    if kind == "jsonl":
        return load_prompts(path)
    if kind in ("csv", "tsv"):
        records = _table_records(path, text, TABLE_SUFFIXES[f".{kind}"])
    else:
        lines = [line.strip() for line in text.splitlines()]
        records = [PromptRecord(key=i, prompt=line, instruction_id_list=[], kwargs=[]) for i, line in enumerate(lines)]
        records = [r for r in records if r.prompt]
    if not records:
        unit = "a 'prompt' value per row" if kind != "text" else "one prompt per line"
        raise WeightPatchError(f"{path}: no prompts (the file is empty); expected {unit}")
    return records
