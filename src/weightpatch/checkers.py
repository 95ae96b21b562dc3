"""The IFEval checker registry: verifiable checkers for the six format constraints of the paper and the
end phrase of the merge benchmarks' second expert, and IFEval's scoring.

Every builtin checker is an :class:`InstructionChecker` registered here by its IFEval instruction id
(:data:`CHECKERS`; :func:`instruction_checker` refuses an unknown id with the list of known ones).
Adding one: its function below, then one :func:`register` call.

The checks reproduce ``instruction_following_eval/instructions.py`` (google-research) and the strict /
loose evaluation of ``evaluation_lib.py``:

- ``change_case:english_capital``: ``response.isupper()`` and the response is English. IFEval asks
  ``langdetect``; weightpatch does not depend on it and skips the language test (every response of the
  demo pair is English). Pass ``language_check=callable`` to :func:`check_instruction` to add one.
- ``punctuation:no_comma``: no ``,`` anywhere.
- ``detectable_format:title``: some ``<<...>>`` on one line whose inside is not blank.
- ``detectable_format:multiple_sections``: ``re.split(r"\\s?" + spliter + r"\\s?\\d+\\s?", response)``
  gives at least ``num_sections + 1`` parts (the spliter is matched case-sensitively, as in IFEval).
- ``startend:quotation``: the stripped response is longer than one character, starts and ends with ``"``.
- ``detectable_format:number_highlighted_sections``: the non-blank ``*...*`` plus the non-blank
  ``**...**`` (both counted, as in IFEval) number at least ``num_highlights``.
- ``startend:end_checker``: the stripped response, without enclosing ``"``, ends with ``end_phrase``
  (case-insensitive; IFEval's ``EndChecker``).

Strict: the check on the response (an empty / whitespace-only response follows nothing). Loose: the
check passes on any of the response, the response without its first line, without its last line,
without both, and each of these with every ``*`` removed.

Two backends (``checker=``): ``"builtin"`` (the seven above, no dependencies; the default) and
``"lm_eval"``: lm-eval's IFEval instruction registry (``lm_eval.tasks.ifeval``, the optional extra
``weightpatch[ifeval]``) for all 25 instruction types, with the same strict/loose evaluation as
lm-eval's ``utils.py`` and ``langdetect`` seeded (``DetectorFactory.seed = 0``) so that a verdict on
a given text is deterministic. In :func:`evaluate`, an instruction without a checker (unknown to
the backend, or needing NLTK data that is not installed) is skipped with a warning naming it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from weightpatch.errors import WeightPatchError

logger = logging.getLogger("weightpatch")

Backend = Literal["builtin", "lm_eval"]
BACKENDS: tuple[Backend, ...] = ("builtin", "lm_eval")

CAPITAL = "change_case:english_capital"
NO_COMMA = "punctuation:no_comma"
TITLE = "detectable_format:title"
SECTIONS = "detectable_format:multiple_sections"
QUOTATION = "startend:quotation"
HIGHLIGHTS = "detectable_format:number_highlighted_sections"
END_CHECKER = "startend:end_checker"


def check_english_capital(response: str, language_check: Callable[[str], bool] | None = None) -> bool:
    """All cased characters upper case, at least one of them (``str.isupper``); English if checked."""
    if not response.isupper():
        return False
    return language_check(response) if language_check is not None else True


def check_no_comma(response: str) -> bool:
    return "," not in response


def check_title(response: str) -> bool:
    return any(title.lstrip("<").rstrip(">").strip() for title in re.findall(r"<<[^\n]+>>", response))


def check_multiple_sections(response: str, num_sections: int, section_spliter: str = "SECTION") -> bool:
    spliter = section_spliter.strip()
    sections = re.split(r"\s?" + spliter + r"\s?\d+\s?", response)
    return len(sections) - 1 >= num_sections


def check_quotation(response: str) -> bool:
    value = response.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


def count_highlights(response: str) -> int:
    """IFEval's count: non-blank ``*x*`` matches plus non-blank ``**x**`` matches."""
    n = 0
    for h in re.findall(r"\*[^\n\*]*\*", response):
        if h.strip("*").strip():
            n += 1
    for h in re.findall(r"\*\*[^\n\*]*\*\*", response):
        if h.removeprefix("**").removesuffix("**").strip():
            n += 1
    return n


def check_highlighted_sections(response: str, num_highlights: int) -> bool:
    return count_highlights(response) >= num_highlights


def check_end_phrase(response: str, end_phrase: str) -> bool:
    """IFEval's ``EndChecker``: the stripped response, without enclosing ``"``, ends with the phrase
    (case-insensitive)."""
    value = response.strip().strip('"').lower()
    return value.endswith(end_phrase.strip().lower())


class NoChecker(WeightPatchError):
    """An instruction the chosen backend cannot check (skipped by :func:`evaluate`)."""


@dataclass(frozen=True)
class InstructionChecker:
    """A builtin checker: ``name`` (the IFEval instruction id), ``check(response, **kwargs)``, the
    IFEval kwargs it ``requires`` and those it also takes (``optional``), ``probe``: the kwargs that
    make it detect its format without being asked (:func:`format_rates`; None: not a format), and
    ``language``: whether it takes IFEval's language test (``language_check=``)."""

    name: str
    check: Callable[..., bool]
    requires: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    probe: Mapping[str, Any] | None = None
    language: bool = False

    def __call__(
        self,
        response: str,
        kwargs: Mapping[str, Any] | None = None,
        *,
        language_check: Callable[[str], bool] | None = None,
    ) -> bool:
        """Whether ``response`` follows the instruction with IFEval ``kwargs`` (``None`` values
        ignored); a missing required kwarg is refused by name."""
        given = {k: v for k, v in (kwargs or {}).items() if v is not None}
        missing = [k for k in self.requires if k not in given]
        if missing:
            raise WeightPatchError(f"instruction {self.name!r} needs kwargs {missing}; got {sorted(given)}")
        args = {k: given[k] for k in (*self.requires, *self.optional) if k in given}
        if self.language:
            return self.check(response, language_check=language_check, **args)
        return self.check(response, **args)


CHECKERS: dict[str, InstructionChecker] = {}


def register(checker: InstructionChecker) -> InstructionChecker:
    if checker.name in CHECKERS:
        raise ValueError(f"checker {checker.name!r} is registered twice")
    CHECKERS[checker.name] = checker
    return checker


def instruction_checker(name: str) -> InstructionChecker:
    """The builtin checker of instruction ``name``; an unknown one raises :class:`NoChecker` with the
    list of registered ids."""
    if name not in CHECKERS:
        raise NoChecker(
            f"no checker for instruction {name!r}; supported: {', '.join(CHECKERS)} "
            f"(all 25 IFEval types with pip install 'weightpatch[ifeval]' and checker 'lm_eval')"
        )
    return CHECKERS[name]


register(InstructionChecker(CAPITAL, check_english_capital, probe={}, language=True))
register(InstructionChecker(NO_COMMA, check_no_comma, probe={}))
register(InstructionChecker(TITLE, check_title, probe={}))
register(
    InstructionChecker(SECTIONS, check_multiple_sections, ("num_sections",), ("section_spliter",), {"num_sections": 1})
)
register(InstructionChecker(QUOTATION, check_quotation, probe={}))
register(InstructionChecker(HIGHLIGHTS, check_highlighted_sections, ("num_highlights",), probe={"num_highlights": 1}))
register(InstructionChecker(END_CHECKER, check_end_phrase, ("end_phrase",)))

#: The instruction ids the builtin checkers support (registration order).
SUPPORTED_INSTRUCTIONS: tuple[str, ...] = tuple(CHECKERS)
#: The formats among them (those with a probe, :func:`format_rates`): the six of the paper.
FORMAT_INSTRUCTIONS: tuple[str, ...] = tuple(c.name for c in CHECKERS.values() if c.probe is not None)


@functools.cache
def lm_eval_registry() -> dict[str, Any]:
    """lm-eval's ``INSTRUCTION_DICT`` (instruction id -> checker class), imported on first use.

    ``langdetect`` is seeded (``DetectorFactory.seed = 0``). lm-eval downloads NLTK's ``punkt_tab``
    when importing its checkers; weightpatch never downloads at run time, so a missing ``punkt_tab``
    is not fetched (the two instructions that need NLTK's tokenizers are then skipped, see
    :func:`evaluate`)."""
    try:
        import langdetect
        import nltk
    except ImportError as exc:
        raise WeightPatchError(
            f"the lm_eval checker needs lm-eval's IFEval dependencies ({exc.name} is missing); "
            f"pip install 'weightpatch[ifeval]', or use the builtin checker"
        ) from exc
    langdetect.DetectorFactory.seed = 0
    download = nltk.download
    nltk.download = lambda *args, **kwargs: False  # lm-eval calls it at import when punkt_tab is absent
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and then prints that it downloaded it
            from lm_eval.tasks.ifeval import instructions_registry
    except ImportError as exc:
        raise WeightPatchError(
            f"the lm_eval checker needs lm-eval ({exc.name} is missing); pip install 'weightpatch[ifeval]', "
            f"or use the builtin checker"
        ) from exc
    finally:
        nltk.download = download
    return dict(instructions_registry.INSTRUCTION_DICT)


def supported_instructions(checker: Backend = "builtin") -> tuple[str, ...]:
    """The instruction ids a backend has checkers for."""
    if checker == "builtin":
        return SUPPORTED_INSTRUCTIONS
    if checker == "lm_eval":
        return tuple(sorted(lm_eval_registry()))
    raise WeightPatchError(f"unknown checker {checker!r}; use one of {', '.join(BACKENDS)}")


def _check_lm_eval(instruction_id: str, response: str, kwargs: dict | None, prompt: str | None) -> bool:
    """lm-eval's ``test_instruction_following_strict`` for one instruction, without the empty guard."""
    registry = lm_eval_registry()
    if instruction_id not in registry:
        raise NoChecker(f"lm-eval's IFEval registry has no instruction {instruction_id!r}")
    instruction = registry[instruction_id](instruction_id)
    instruction.build_description(**{k: v for k, v in (kwargs or {}).items() if v})
    args = instruction.get_instruction_args()
    if args and "prompt" in args:
        if prompt is None:
            raise WeightPatchError(f"instruction {instruction_id!r} is checked against the prompt; pass prompt=")
        instruction.build_description(prompt=prompt)
    try:
        return bool(instruction.check_following(response))
    except LookupError as exc:  # NLTK data (punkt_tab) not installed
        raise NoChecker(
            f"lm-eval's check of {instruction_id!r} needs NLTK tokenizer data that is not installed "
            f"(python -m nltk.downloader punkt_tab punkt)"
        ) from exc


def check_instruction(
    instruction_id: str,
    response: str,
    kwargs: dict | None = None,
    *,
    language_check: Callable[[str], bool] | None = None,
    checker: Backend = "builtin",
    prompt: str | None = None,
) -> bool:
    """Whether ``response`` follows one instruction (IFEval's ``check_following``, no empty-guard).

    ``kwargs`` are IFEval's; keys with value ``None`` are ignored (the Hugging Face copy of IFEval
    stores every key of every instruction, mostly ``None``). ``prompt`` is needed by lm-eval's
    ``combination:repeat_prompt``. Raises :class:`NoChecker` for an instruction the backend lacks.
    """
    if checker == "lm_eval":
        return _check_lm_eval(instruction_id, response, kwargs, prompt)
    if checker != "builtin":
        raise WeightPatchError(f"unknown checker {checker!r}; use one of {', '.join(BACKENDS)}")
    return instruction_checker(instruction_id)(response, kwargs, language_check=language_check)


def seeded_english_check() -> Callable[[str], bool]:
    """IFEval's English test for :func:`check_english_capital`: ``langdetect.detect(text) == "en"``
    with ``langdetect`` seeded (deterministic); False when it cannot detect a language."""
    import langdetect

    langdetect.DetectorFactory.seed = 0

    def is_english(text: str) -> bool:
        try:
            return langdetect.detect(text) == "en"
        except langdetect.LangDetectException:
            return True  # IFEval's own fallback: an undetectable text passes

    return is_english


def loose_variants(response: str) -> list[str]:
    """The eight response variants of IFEval's loose evaluation, in its order."""
    r = response.split("\n")
    remove_first = "\n".join(r[1:]).strip()
    remove_last = "\n".join(r[:-1]).strip()
    remove_both = "\n".join(r[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        remove_first,
        remove_last,
        remove_both,
        remove_first.replace("*", ""),
        remove_last.replace("*", ""),
        remove_both.replace("*", ""),
    ]


def follows(
    instruction_id: str,
    response: str,
    kwargs: dict | None = None,
    *,
    loose: bool = False,
    language_check: Callable[[str], bool] | None = None,
    checker: Backend = "builtin",
    prompt: str | None = None,
) -> bool:
    """IFEval's strict (default) or loose verdict for one instruction."""
    candidates = loose_variants(response) if loose else [response]
    return any(
        c.strip()
        and check_instruction(instruction_id, c, kwargs, language_check=language_check, checker=checker, prompt=prompt)
        for c in candidates
    )


@dataclass
class PromptResult:
    """The verdicts for one prompt: one bool per checked instruction, strict and loose.
    ``instruction_id_list`` holds the checked instructions; ``skipped`` those without a checker."""

    key: int | str | None
    instruction_id_list: list[str]
    strict: list[bool]
    loose: list[bool]
    response: str = ""
    skipped: list[str] = field(default_factory=list)

    @property
    def strict_all(self) -> bool:
        return all(self.strict)

    @property
    def loose_all(self) -> bool:
        return all(self.loose)


def evaluate_response(
    instruction_id_list: Sequence[str],
    kwargs: Sequence[dict],
    response: str,
    *,
    key: int | str | None = None,
    language_check: Callable[[str], bool] | None = None,
    checker: Backend = "builtin",
    prompt: str | None = None,
) -> PromptResult:
    """Strict and loose verdicts for every instruction of one prompt; instructions the backend has
    no checker for are listed in :attr:`PromptResult.skipped` instead."""
    if len(kwargs) != len(instruction_id_list):
        raise WeightPatchError(f"prompt {key}: {len(instruction_id_list)} instructions but {len(kwargs)} kwargs dicts")
    ids, strict, loose, skipped = [], [], [], []
    for instruction_id, kw in zip(instruction_id_list, kwargs, strict=True):
        options = {"language_check": language_check, "checker": checker, "prompt": prompt}
        try:
            verdicts = (
                follows(instruction_id, response, kw, **options),
                follows(instruction_id, response, kw, loose=True, **options),
            )
        except NoChecker:
            skipped.append(instruction_id)
            continue
        ids.append(instruction_id)
        strict.append(verdicts[0])
        loose.append(verdicts[1])
    return PromptResult(key, ids, strict, loose, response, skipped)


@dataclass
class Accuracy:
    """IFEval's four headline numbers plus per-instruction accuracy (strict and loose)."""

    n_prompts: int
    prompt_strict: float
    prompt_loose: float
    instruction_strict: float
    instruction_loose: float
    per_instruction_strict: dict[str, float] = field(default_factory=dict)
    per_instruction_loose: dict[str, float] = field(default_factory=dict)
    per_instruction_count: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # instruction id -> occurrences without a checker

    def as_dict(self) -> dict:
        return {
            "n_prompts": self.n_prompts,
            "prompt_strict": self.prompt_strict,
            "prompt_loose": self.prompt_loose,
            "instruction_strict": self.instruction_strict,
            "instruction_loose": self.instruction_loose,
            "per_instruction_strict": dict(self.per_instruction_strict),
            "per_instruction_loose": dict(self.per_instruction_loose),
            "per_instruction_count": dict(self.per_instruction_count),
            "skipped": dict(self.skipped),
        }


def accuracy(results: Sequence[PromptResult]) -> Accuracy:
    """Prompt-level and instruction-level accuracy, overall and per instruction id, over the checked
    instructions (a prompt whose every instruction was skipped for want of a checker counts in neither;
    with no checked instruction at all every accuracy is NaN, never an error)."""
    if not results:
        raise WeightPatchError("no results to score: the prompt set is empty")
    total: dict[str, int] = defaultdict(int)
    ok_s: dict[str, int] = defaultdict(int)
    ok_l: dict[str, int] = defaultdict(int)
    skipped: dict[str, int] = defaultdict(int)
    for r in results:
        for i, s, lo in zip(r.instruction_id_list, r.strict, r.loose, strict=True):
            total[i] += 1
            ok_s[i] += s
            ok_l[i] += lo
        for i in r.skipped:
            skipped[i] += 1
    scored = [r for r in results if r.instruction_id_list or not r.skipped]
    nan = float("nan")
    n_instr = sum(total.values())
    return Accuracy(
        n_prompts=len(scored),
        prompt_strict=sum(r.strict_all for r in scored) / len(scored) if scored else nan,
        prompt_loose=sum(r.loose_all for r in scored) / len(scored) if scored else nan,
        instruction_strict=sum(ok_s.values()) / n_instr if n_instr else nan,
        instruction_loose=sum(ok_l.values()) / n_instr if n_instr else nan,
        per_instruction_strict={i: ok_s[i] / total[i] for i in sorted(total)},
        per_instruction_loose={i: ok_l[i] / total[i] for i in sorted(total)},
        per_instruction_count={i: total[i] for i in sorted(total)},
        skipped=dict(sorted(skipped.items())),
    )


def evaluate(
    records: Sequence, responses: Sequence[str], *, checker: Backend = "builtin"
) -> tuple[Accuracy, list[PromptResult]]:
    """Score ``responses`` against prompt records (``PromptRecord`` or IFEval dicts), in order.
    Instructions without a checker are skipped with one warning naming them (never an error)."""
    if len(records) != len(responses):
        raise WeightPatchError(f"{len(records)} prompts but {len(responses)} responses")
    results = []
    for rec, resp in zip(records, responses, strict=True):
        get = rec.get if isinstance(rec, dict) else lambda name, r=rec: getattr(r, name)
        results.append(
            evaluate_response(
                get("instruction_id_list"), get("kwargs"), resp, key=get("key"), checker=checker, prompt=get("prompt")
            )
        )
    score = accuracy(results)
    if score.skipped:
        listed = ", ".join(f"{i} ({n}x)" for i, n in score.skipped.items())
        logger.warning(
            "instructions without a %s checker are skipped in the behavioural metrics: %s%s",
            checker,
            listed,
            "; pip install 'weightpatch[ifeval]' and use the lm_eval checker for all 25"
            if checker == "builtin"
            else "",
        )
    return score, results


def strict_prompt_accuracy(records: Sequence, responses: Sequence[str], *, checker: Backend = "builtin") -> float:
    """IFEval strict prompt-level accuracy of ``responses`` on prompt records (records or dicts):
    :func:`evaluate`'s ``prompt_strict`` (instructions without a checker skipped with a warning)."""
    if not records:
        raise WeightPatchError("no prompt records to score")
    return evaluate(records, responses, checker=checker)[0].prompt_strict


def format_rates(responses: Sequence[str]) -> dict[str, float]:
    """Fraction of responses showing each format (strict checks with each checker's ``probe`` kwargs:
    one section, one highlight); for unrequested-format rates.

    Note that ``punctuation:no_comma`` also fires on a response that has no comma by chance.
    """
    if not responses:
        raise WeightPatchError("no responses")
    probes = [c for c in CHECKERS.values() if c.probe is not None]
    return {c.name: sum(c(r, c.probe) for r in responses) / len(responses) for c in probes}
