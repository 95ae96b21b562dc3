"""The seven IFEval checkers against IFEval's semantics, the checker registry, and strict / loose scoring."""

import pytest

from weightpatch import checkers as C
from weightpatch.errors import WeightPatchError


class TestEnglishCapital:
    def test_all_caps(self):
        assert C.check_english_capital("THE RIVER IS OLD, CALM AND GREEN.")

    def test_digits_and_punctuation_do_not_matter(self):
        assert C.check_english_capital("SECTION 1\n<<THE 3 RIVERS>> *HI* 42!")

    def test_one_lowercase_letter_fails(self):
        assert not C.check_english_capital("THE RIVEr IS OLD.")

    def test_no_cased_character_fails(self):  # str.isupper() needs at least one cased character
        assert not C.check_english_capital("123 !!!")
        assert not C.check_english_capital("")

    def test_language_hook(self):
        assert not C.check_english_capital("HOLA AMIGO", language_check=lambda s: False)
        assert C.check_english_capital("HELLO FRIEND", language_check=lambda s: True)


class TestNoComma:
    def test_plain(self):
        assert C.check_no_comma("the river is old and calm.")
        assert not C.check_no_comma("the river is old, calm.")

    def test_other_comma_like_characters_are_allowed(self):  # IFEval looks for "," only
        assert C.check_no_comma("a\u060cb \uff0c c")


class TestTitle:
    def test_title_anywhere(self):
        assert C.check_title("<<poem of joy>>\nsome text")
        assert C.check_title("text first <<a title>> then more")

    def test_empty_or_blank_title_fails(self):
        assert not C.check_title("<<>> text")
        assert not C.check_title("<<   >> text")

    def test_title_over_newline_fails(self):
        assert not C.check_title("<<poem\nof joy>>")

    def test_second_title_counts_if_first_blank(self):
        assert C.check_title("<< >> and <<real>>")

    def test_single_brackets_fail(self):
        assert not C.check_title("<title>")


class TestMultipleSections:
    def test_count(self):
        text = "SECTION 1\nfirst part.\nSECTION 2\nsecond part."
        assert C.check_multiple_sections(text, 2)
        assert not C.check_multiple_sections(text, 3)

    def test_at_least(self):
        text = "SECTION 1 a SECTION 2 b SECTION 3 c"
        assert C.check_multiple_sections(text, 2)

    def test_case_sensitive_spliter(self):  # IFEval's re.split has no IGNORECASE
        assert not C.check_multiple_sections("section 1 a section 2 b", 2, "SECTION")
        assert C.check_multiple_sections("Section 1 a Section 2 b", 2, "Section")

    def test_number_required(self):
        assert not C.check_multiple_sections("SECTION a SECTION b", 1)

    def test_spliter_is_stripped(self):
        assert C.check_multiple_sections("SECTION 1 a SECTION 2 b", 2, " SECTION ")

    def test_kwargs_via_dispatch(self):
        kwargs = {"section_spliter": "SECTION", "num_sections": 2}
        assert C.check_instruction(C.SECTIONS, "SECTION 1 x\nSECTION 2 y", kwargs)


class TestQuotation:
    def test_wrapped(self):
        assert C.check_quotation('"the river is old."')
        assert C.check_quotation('  "the river"\n')

    def test_single_quote_char_fails(self):
        assert not C.check_quotation('"')
        assert not C.check_quotation('  "  ')  # stripped to one character

    def test_two_quote_chars_pass(self):  # len > 1, starts and ends with '"'
        assert C.check_quotation('""')

    def test_half_wrapped_fails(self):
        assert not C.check_quotation('"the river is old.')
        assert not C.check_quotation("'the river'")


class TestHighlights:
    def test_single_asterisks(self):
        assert C.count_highlights("*one* and *two* and plain") == 2

    def test_double_asterisks_count_once(self):
        # IFEval: the '*' regex only finds the empty "**" pairs here; the '**' regex finds "**bold**"
        assert C.count_highlights("**bold**") == 1
        assert C.count_highlights("*one* and **two**") == 2

    def test_empty_and_blank_highlights_do_not_count(self):
        assert C.count_highlights("** and * *") == 0

    def test_newline_breaks_highlight(self):
        assert C.count_highlights("*one\ntwo*") == 0

    def test_threshold(self):
        assert C.check_highlighted_sections("*a* *b*", 2)
        assert not C.check_highlighted_sections("*a* b", 2)

    def test_real_ifeval_style_response(self):
        text = "Here is my answer.\n*Section one: the basics*\nSome text.\n*Section two: details*"
        assert C.check_instruction(C.HIGHLIGHTS, text, {"num_highlights": 2})


class TestEndPhrase:  # IFEval's EndChecker: strip, strip '"', lower-case, endswith the stripped lower phrase
    PHRASE = "Any other questions?"

    def test_ends_with_the_phrase(self):
        assert C.check_end_phrase("The river is old. Any other questions?", self.PHRASE)
        assert C.check_end_phrase("x Any other questions?  ", self.PHRASE)

    def test_case_quotes_and_whitespace_do_not_matter(self):
        assert C.check_end_phrase('"the river is old. ANY OTHER QUESTIONS?"\n', self.PHRASE)
        assert C.check_end_phrase("the river. any other questions?", "  Any other questions?  ")

    def test_words_after_the_phrase_fail(self):
        assert not C.check_end_phrase("Any other questions? yes", self.PHRASE)
        assert not C.check_end_phrase("Any other questions? *", self.PHRASE)
        assert not C.check_end_phrase("Any other questions", self.PHRASE)

    def test_through_the_registry_strict_and_loose(self):
        kwargs = {"end_phrase": self.PHRASE}
        assert C.check_instruction(C.END_CHECKER, "ok. Any other questions?", kwargs)
        assert not C.follows(C.END_CHECKER, "", kwargs)  # an empty response follows nothing
        assert not C.follows(C.END_CHECKER, "Any other questions?\n*", kwargs)
        assert C.follows(C.END_CHECKER, "Any other questions?\n*", kwargs, loose=True)  # without the last line
        with pytest.raises(WeightPatchError, match="end_phrase"):
            C.check_instruction(C.END_CHECKER, "x", {"end_phrase": None})

    def test_strict_prompt_accuracy(self):
        records = [
            {"key": 1, "prompt": "p", "instruction_id_list": [C.END_CHECKER], "kwargs": [{"end_phrase": self.PHRASE}]},
            {
                "key": 2,
                "prompt": "p",
                "instruction_id_list": [C.NO_COMMA, C.END_CHECKER],
                "kwargs": [{}, {"end_phrase": "Bye."}],
            },
            {"key": 3, "prompt": "p", "instruction_id_list": [C.NO_COMMA], "kwargs": [{}]},
        ]
        responses = ['"the end. any other questions?"', "a, b. Bye.", "   "]
        assert C.strict_prompt_accuracy(records, responses) == pytest.approx(1 / 3)


class TestRegistry:
    def test_every_builtin_instruction_is_registered_in_order(self):
        expected = (C.CAPITAL, C.NO_COMMA, C.TITLE, C.SECTIONS, C.QUOTATION, C.HIGHLIGHTS, C.END_CHECKER)
        assert C.SUPPORTED_INSTRUCTIONS == tuple(C.CHECKERS) == expected
        assert C.supported_instructions("builtin") == expected
        assert expected[:6] == C.FORMAT_INSTRUCTIONS  # the end phrase is not a format
        assert all(C.instruction_checker(name).name == name for name in expected)

    def test_unknown_name_lists_the_registered_ones(self):
        with pytest.raises(C.NoChecker, match="no checker for instruction 'keywords:existence'") as info:
            C.instruction_checker("keywords:existence")
        assert isinstance(info.value, WeightPatchError)
        assert all(name in str(info.value) for name in C.CHECKERS)

    def test_a_name_is_registered_once(self):
        with pytest.raises(ValueError, match="registered twice"):
            C.register(C.InstructionChecker(C.NO_COMMA, C.check_no_comma))

    def test_a_registered_checker_is_used_by_evaluation(self, monkeypatch):
        monkeypatch.setitem(
            C.CHECKERS, "test:starts_with_x", C.InstructionChecker("test:starts_with_x", lambda r: r[0] == "x")
        )
        score, _ = C.evaluate(
            [{"key": 0, "prompt": "p", "instruction_id_list": ["test:starts_with_x"], "kwargs": [{}]}], ["xy"]
        )
        assert score.prompt_strict == 1.0 and score.skipped == {}

    def test_format_rates_cover_the_formats(self):
        assert tuple(C.format_rates(["x"])) == C.FORMAT_INSTRUCTIONS


class TestDispatch:
    def test_unknown_instruction(self):
        with pytest.raises(WeightPatchError, match="no checker"):
            C.check_instruction("language:response_language", "x", {})

    def test_missing_kwarg(self):
        with pytest.raises(WeightPatchError, match="num_highlights"):
            C.check_instruction(C.HIGHLIGHTS, "*a*", {})

    def test_none_kwargs_ignored(self):  # the HF copy of IFEval fills every key with null
        kwargs = {"num_highlights": 1, "section_spliter": None, "num_sections": None, "language": None}
        assert C.check_instruction(C.HIGHLIGHTS, "*a*", kwargs)


class TestStrictLoose:
    def test_empty_response_follows_nothing(self):
        assert not C.follows(C.NO_COMMA, "   ")
        assert not C.follows(C.NO_COMMA, "   ", loose=True)

    def test_loose_drops_first_line(self):
        response = "Sure, here it is:\nTHE RIVER IS OLD AND CALM."
        assert not C.follows(C.CAPITAL, response)
        assert C.follows(C.CAPITAL, response, loose=True)
        assert C.follows(C.NO_COMMA, response, loose=True)

    def test_loose_drops_last_line(self):
        response = '"the river is old."\nHope this helps!'
        assert not C.follows(C.QUOTATION, response)
        assert C.follows(C.QUOTATION, response, loose=True)

    def test_loose_removes_asterisks(self):
        response = '**"the river is old."**'
        assert not C.follows(C.QUOTATION, response)
        assert C.follows(C.QUOTATION, response, loose=True)

    def test_loose_variants_order_and_count(self):
        v = C.loose_variants("a*\nb\nc")
        assert len(v) == 8
        assert v[0] == "a*\nb\nc" and v[1] == "a\nb\nc" and v[2] == "b\nc" and v[4] == "b"

    def test_evaluate_and_accuracy(self):
        records = [
            {"key": 1, "instruction_id_list": [C.CAPITAL, C.NO_COMMA], "kwargs": [{}, {}]},
            {"key": 2, "instruction_id_list": [C.TITLE], "kwargs": [{}]},
            {"key": 3, "instruction_id_list": [C.QUOTATION], "kwargs": [{}]},
        ]
        responses = ["THE RIVER, OLD.", "<<t>>\nx", 'Sure:\n"x"']
        acc, results = C.evaluate(records, responses)
        assert results[0].strict == [True, False]
        assert acc.prompt_strict == pytest.approx(1 / 3)
        assert acc.prompt_loose == pytest.approx(2 / 3)  # the quotation passes once "Sure:" is dropped
        assert acc.instruction_strict == pytest.approx(2 / 4)
        assert acc.instruction_loose == pytest.approx(3 / 4)
        assert acc.per_instruction_strict[C.NO_COMMA] == 0.0
        assert acc.per_instruction_count == {C.CAPITAL: 1, C.NO_COMMA: 1, C.QUOTATION: 1, C.TITLE: 1}

    def test_evaluate_length_mismatch(self):
        with pytest.raises(WeightPatchError):
            C.evaluate([{"key": 1, "instruction_id_list": [], "kwargs": []}], [])

    def test_format_rates(self):
        rates = C.format_rates(["PLAIN, TEXT", "<<t>> x, y", '"a, b"', "a b"])
        assert rates[C.CAPITAL] == 0.25
        assert rates[C.TITLE] == 0.25
        assert rates[C.QUOTATION] == 0.25
        assert rates[C.NO_COMMA] == 0.25
        assert rates[C.SECTIONS] == 0.0
