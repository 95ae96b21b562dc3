"""The demo corpus and shipped prompt files: reproducible, IFEval schema, disjoint from training."""

import random

import pytest

from weightpatch import demo
from weightpatch.checkers import FORMAT_INSTRUCTIONS, SUPPORTED_INSTRUCTIONS, evaluate_response, format_rates
from weightpatch.demo import corpus
from weightpatch.demo.train import DEFAULTS


@pytest.fixture(scope="module")
def training_prompts():
    base = corpus.base_corpus(DEFAULTS["base_examples"], 0)
    sft = corpus.sft_corpus(DEFAULTS["sft_examples"], 0)
    return {e.prompt for e in base + sft if e.chat}


@pytest.mark.parametrize("split", demo.SPLITS)
def test_shipped_files_are_the_generated_ones(split):
    records = demo.prompts(split)
    assert [r.to_dict() for r in records] == corpus.prompt_split(split)


@pytest.mark.parametrize("split", demo.SPLITS)
def test_schema_and_instruction_free_pairs(split):
    records = demo.prompts(split)
    assert len({r.key for r in records}) == len(records)
    for r in records:
        assert set(r.instruction_id_list) <= set(SUPPORTED_INSTRUCTIONS)
        assert r.prompt.startswith(r.prompt_without_instruction + " ")
        for i, k in zip(r.instruction_id_list, r.kwargs, strict=True):
            expected = {
                corpus.SECTIONS: {"section_spliter", "num_sections"},
                corpus.HIGHLIGHTS: {"num_highlights"},
            }.get(i, set())
            assert set(k) == expected
    ids = {i for r in records for i in r.instruction_id_list}
    assert ids == set(corpus.INSTRUCTION_IDS)


def test_splits_disjoint_from_training_and_each_other(training_prompts):
    anchor = {r.prompt for r in demo.prompts("anchor")}
    heldout = {r.prompt for r in demo.prompts("heldout")}
    assert not anchor & training_prompts
    assert not heldout & training_prompts
    assert not anchor & heldout
    plain_training = {p for p in training_prompts if p[-1] == "." and p.count(".") == 1}
    assert not {r.prompt_without_instruction for r in demo.prompts("heldout")} & plain_training


def test_rendered_responses_follow_exactly_their_instructions():
    """The corpus's target responses pass the checkers; the base style passes none of the formats."""
    rng = random.Random(0)
    for r in demo.prompts("heldout"):
        topic = r.prompt_without_instruction.split(" about the ")[1].rstrip(".")
        sents = corpus.plain_sentences(topic, rng)
        target = corpus.render_response(topic, sents, r.instruction_id_list, r.kwargs)
        result = evaluate_response(r.instruction_id_list, r.kwargs, target)
        assert all(result.strict), (r.prompt, target)
        plain = corpus.render_response(topic, sents, [], [])
        assert not any(evaluate_response(r.instruction_id_list, r.kwargs, plain).loose), plain
        rates = format_rates([plain])
        assert sum(rates.values()) == 0


def test_base_corpus_ignores_instructions():
    examples = corpus.base_corpus(300, 0)
    with_instructions = [e for e in examples if e.instruction_id_list]
    assert len(with_instructions) > 100
    assert all(format_rates([e.response]) == dict.fromkeys(FORMAT_INSTRUCTIONS, 0.0) for e in examples)
