"""Real IFEval inputs: the IFEval schema as IFEval ships it, lm-eval's checkers for all instruction
types, and the built-in seven against lm-eval's verdicts."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from weightpatch import checkers as C
from weightpatch import demo
from weightpatch.anchors import build_anchor
from weightpatch.errors import WeightPatchError
from weightpatch.generation import generate
from weightpatch.pair import load_pair
from weightpatch.prompts import load_prompts, without_instruction
from weightpatch.runner import render_prompts
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen

SAMPLE = Path(__file__).parent / "data" / "ifeval_sample.jsonl"
SAMPLE_RESPONSES = [
    "*Origins* the river began small\n*Growth* it grew\n*Today* it is wide",
    "Dear [name] I live at [address] and the garden is lovely.\nP.S. see you soon",
    "* one\n* two\n* three",
    "the waves bring salt to the shore and the sea is calm.",
    '```json\n{"mountain": "tall"}\n```',
    '"The forest is old. Is there anything else I can help with?"',
]

#: Responses for the seven built-in types (kwargs as in IFEval), chosen around each check's edges.
BUILTIN_CASES = [
    (C.CAPITAL, {}, "THE RIVER IS OLD AND CALM AND THE WATER IS GREEN."),
    (C.CAPITAL, {}, "THE RIVEr IS OLD."),
    (C.CAPITAL, {}, "Intro line\nTHE GARDEN IS FULL OF FLOWERS AND BIRDS SING ALL DAY."),
    (C.CAPITAL, {}, "LE JARDIN EST PLEIN DE FLEURS ET LES OISEAUX CHANTENT TOUTE LA JOURNEE."),
    (C.NO_COMMA, {}, "the river is old and calm."),
    (C.NO_COMMA, {}, "the river is old, calm."),
    (C.NO_COMMA, {}, "a line, with a comma\nthe rest has none"),
    (C.TITLE, {}, "<<poem of joy>>\nsome text"),
    (C.TITLE, {}, "<<   >> text"),
    (C.TITLE, {}, "<<poem\nof joy>>"),
    (C.SECTIONS, {"section_spliter": "SECTION", "num_sections": 2}, "SECTION 1\nfirst.\nSECTION 2\nsecond."),
    (C.SECTIONS, {"section_spliter": "Section", "num_sections": 2}, "SECTION 1\nfirst.\nSECTION 2\nsecond."),
    (C.SECTIONS, {"section_spliter": "PARAGRAPH", "num_sections": 3}, "PARAGRAPH 1 a PARAGRAPH 2 b"),
    (C.QUOTATION, {}, '"the river is old"'),
    (C.QUOTATION, {}, 'Here it is:\n"the river is old"'),
    (C.QUOTATION, {}, '"'),
    (C.HIGHLIGHTS, {"num_highlights": 2}, "*one* and **two**"),
    (C.HIGHLIGHTS, {"num_highlights": 3}, "*one* and *two*"),
    (C.HIGHLIGHTS, {"num_highlights": 2}, "** ** and * * and *x*"),
    (C.HIGHLIGHTS, {"num_highlights": 1}, "no highlights at all"),
    (C.END_CHECKER, {"end_phrase": "Any other questions?"}, "the river is old. any other questions?"),
    (C.END_CHECKER, {"end_phrase": "Any other questions?"}, '"The river is old. Any other questions?"\n'),
    (C.END_CHECKER, {"end_phrase": "Any other questions?"}, "Any other questions? The river is old."),
    (C.END_CHECKER, {"end_phrase": "Any other questions?"}, "Any other questions?\n*"),
]


def _lm_eval_utils():
    pytest.importorskip("lm_eval")
    pytest.importorskip("langdetect")
    C.lm_eval_registry()  # imports lm-eval's checkers without an NLTK download
    from lm_eval.tasks.ifeval import utils

    return utils


def _their_verdicts(utils, instruction_id, kwargs, response, prompt="p"):
    inp = utils.InputExample(key=0, instruction_id_list=[instruction_id], prompt=prompt, kwargs=[kwargs])
    strict = utils.test_instruction_following_strict(inp, response).follow_instruction_list[0]
    loose = utils.test_instruction_following_loose(inp, response).follow_instruction_list[0]
    return strict, loose


def test_builtin_checkers_match_lm_evals_verdicts():
    utils = _lm_eval_utils()
    english = C.seeded_english_check()
    differ_without_langdetect = []
    for instruction_id, kwargs, response in BUILTIN_CASES:
        theirs = _their_verdicts(utils, instruction_id, kwargs, response)
        ours = [C.follows(instruction_id, response, kwargs, loose=lo, language_check=english) for lo in (False, True)]
        assert tuple(ours) == theirs, (instruction_id, response)
        default = tuple(C.follows(instruction_id, response, kwargs, loose=lo) for lo in (False, True))
        if default != theirs:
            differ_without_langdetect.append(response)
    # the dependency-free default skips the language test, so only a verdict that hangs on langdetect
    # differs: it takes this upper-case English line for German (and the French one for English)
    assert differ_without_langdetect == [BUILTIN_CASES[2][2]]


def test_lm_eval_backend_matches_lm_evals_own_evaluation():
    utils = _lm_eval_utils()
    records = load_prompts(SAMPLE)
    checked = 0
    for record, response in zip(records, SAMPLE_RESPONSES, strict=True):
        ours = C.evaluate_response(
            record.instruction_id_list, record.kwargs, response, checker="lm_eval", prompt=record.prompt
        )
        inp = utils.InputExample(record.key, record.instruction_id_list, record.prompt, record.kwargs)
        assert ours.skipped == []
        assert ours.strict == utils.test_instruction_following_strict(inp, response).follow_instruction_list
        assert ours.loose == utils.test_instruction_following_loose(inp, response).follow_instruction_list
        checked += len(ours.strict)
    assert checked == 11
    assert len(C.supported_instructions("lm_eval")) == 25


def test_lm_eval_language_verdicts_are_deterministic():
    _lm_eval_utils()
    # short, ambiguous text: unseeded langdetect flips between languages from call to call
    text = "OK BIEN"
    verdicts = {C.follows(C.CAPITAL, text, {}, checker="lm_eval") for _ in range(20)}
    assert len(verdicts) == 1


def test_builtin_skips_unchecked_instructions_with_a_warning(caplog):
    records = load_prompts(SAMPLE)
    with caplog.at_level(logging.WARNING, logger="weightpatch"):
        score, results = C.evaluate(records, SAMPLE_RESPONSES)
    skipped = {
        "detectable_content:number_placeholders": 1,
        "detectable_content:postscript": 1,
        "detectable_format:number_bullet_lists": 1,
        "change_case:english_lowercase": 1,
        "keywords:existence": 1,
        "detectable_format:json_format": 1,
        "length_constraints:number_words": 1,
    }
    assert score.skipped == skipped
    assert all(name in caplog.text for name in skipped)
    # checked: key 1000 (no_comma, highlights) and key 1005 (quotation, end phrase); the other four have none
    assert score.n_prompts == 2
    assert results[0].instruction_id_list == ["punctuation:no_comma", "detectable_format:number_highlighted_sections"]
    assert score.prompt_strict == 1.0 and score.per_instruction_count == {
        "detectable_format:number_highlighted_sections": 1,
        "punctuation:no_comma": 1,
        "startend:end_checker": 1,
        "startend:quotation": 1,
    }


def test_no_checker_for_any_instruction_gives_nan_not_an_error(caplog):
    records = [{"key": 1, "prompt": "p", "instruction_id_list": ["keywords:existence"], "kwargs": [{}]}]
    with caplog.at_level(logging.WARNING, logger="weightpatch"):
        score, _ = C.evaluate(records, ["x"])
    assert score.n_prompts == 0 and math.isnan(score.prompt_loose) and math.isnan(score.instruction_strict)
    assert score.skipped == {"keywords:existence": 1} and "keywords:existence (1x)" in caplog.text


def test_ifeval_lines_need_prompt_without_instruction_only_for_the_instruction_anchor():
    records = load_prompts(SAMPLE)
    assert [r.key for r in records] == list(range(1000, 1006)) and records[1].kwargs[0]["num_placeholders"] == 2
    with pytest.raises(WeightPatchError) as info:
        without_instruction(records)
    message = str(info.value)
    assert "'prompt_without_instruction'" in message and "--method model_diff" in message
    assert "contrasts each prompt with the same request without its instruction" in message


def test_ifeval_file_runs_anchor_screen_and_behaviour_end_to_end():
    """model_diff anchor -> exact screen -> behavioural metric, through the library functions, on
    IFEval's own schema with instruction types outside the built-in six."""
    pair = load_pair(demo.paths().base, demo.paths().specialized)
    records = load_prompts(SAMPLE)
    texts = render_prompts(pair.tokenizer, [r.prompt for r in records])
    anchor = build_anchor(pair, texts, None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, texts, batch_size=6)
    table = ExactScreen(scorer).run(["L0", "L1", "L2", "L3"], progress=False).frame
    scores = table.set_index("component")["score"]
    assert scores["L3"] == 0.0  # above the anchor layer
    assert scores[["L0", "L1", "L2"]].abs().max() > 0
    responses = generate(pair.model, pair.tokenizer, [r.prompt for r in records], max_new_tokens=24, batch_size=6)
    score, _ = C.evaluate(records, responses)
    assert score.n_prompts == 2 and set(score.skipped) and 0.0 <= score.prompt_loose <= 1.0
    if _has_lm_eval():
        full, _ = C.evaluate(records, responses, checker="lm_eval")
        assert full.n_prompts == 6 and full.skipped == {}


def _has_lm_eval() -> bool:
    try:
        C.lm_eval_registry()
    except WeightPatchError:
        return False
    return True
