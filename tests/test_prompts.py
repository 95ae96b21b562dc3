"""IFEval-schema prompt loading: valid files, extensions, and errors that name file, line and field."""

import json

import pytest

from weightpatch.errors import WeightPatchError
from weightpatch.prompts import PromptRecord, load_prompts, read_prompt_file, save_prompts, without_instruction

# Two lines in the exact shape of IFEval's input_data.jsonl (google-research).
IFEVAL_LINES = [
    {
        "key": 1000,
        "prompt": "Write a 300+ word summary of the wikipedia page. Do not use any commas and highlight "
        "at least 3 sections that has titles in markdown format, for example *highlighted section*.",
        "instruction_id_list": [
            "punctuation:no_comma",
            "detectable_format:number_highlighted_sections",
            "length_constraints:number_words",
        ],
        "kwargs": [{}, {"num_highlights": 3}, {"relation": "at least", "num_words": 300}],
    },
    {
        "key": 1001,
        "prompt": "I am planning a trip to Japan. Your response must have 3 sections. Mark the beginning "
        "of each section with SECTION X.",
        "instruction_id_list": ["detectable_format:multiple_sections"],
        "kwargs": [{"section_spliter": "SECTION", "num_sections": 3}],
    },
]


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_loads_plain_ifeval_file(tmp_path):
    records = load_prompts(write_lines(tmp_path / "input_data.jsonl", IFEVAL_LINES))
    assert [r.key for r in records] == [1000, 1001]
    assert records[0].kwargs[1] == {"num_highlights": 3}
    assert records[1].instruction_id_list == ["detectable_format:multiple_sections"]
    assert records[0].prompt_without_instruction is None  # the extension is optional


def test_extension_and_extra_fields_round_trip(tmp_path):
    line = dict(IFEVAL_LINES[1], prompt_without_instruction="I am planning a trip to Japan.", source="me")
    path = write_lines(tmp_path / "p.jsonl", [line, ""])  # a blank line is skipped
    (record,) = load_prompts(path)
    assert record.prompt_without_instruction == "I am planning a trip to Japan."
    assert record.extra == {"source": "me"}
    again = load_prompts(save_prompts([record], tmp_path / "q.jsonl"))
    assert again == [record]
    (plain,) = without_instruction([record])
    assert plain.prompt == "I am planning a trip to Japan." and plain.instruction_id_list == []


def test_without_instruction_needs_the_extension():
    record = PromptRecord(key=1, prompt="x", instruction_id_list=[], kwargs=[])
    with pytest.raises(WeightPatchError, match="prompt_without_instruction"):
        without_instruction([record])


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(WeightPatchError, match="empty"):
        load_prompts(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightPatchError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({k: v for k, v in IFEVAL_LINES[1].items() if k != "kwargs"}, "'kwargs'"),
        ({k: v for k, v in IFEVAL_LINES[1].items() if k != "key"}, "'key'"),
        (dict(IFEVAL_LINES[1], prompt=3), "'prompt'"),
        (dict(IFEVAL_LINES[1], key=[1]), "'key'"),
        (dict(IFEVAL_LINES[1], key=True), "'key'"),
        (dict(IFEVAL_LINES[1], instruction_id_list="detectable_format:title"), "'instruction_id_list'"),
        (dict(IFEVAL_LINES[1], kwargs={"num_sections": 3}), "'kwargs'"),
        (dict(IFEVAL_LINES[1], kwargs=[{}, {}]), "'kwargs'"),
        (dict(IFEVAL_LINES[1], prompt_without_instruction=5), "'prompt_without_instruction'"),
        ([1, 2], "JSON object"),
    ],
)
def test_malformed_line_names_file_line_and_field(tmp_path, bad, field):
    path = write_lines(tmp_path / "bad.jsonl", [IFEVAL_LINES[0], "", bad])
    with pytest.raises(WeightPatchError) as info:
        load_prompts(path)
    message = str(info.value)
    assert f"{path}:3:" in message
    assert field in message


def test_invalid_json_names_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [IFEVAL_LINES[0], '{"key": 1, "prompt": '])
    with pytest.raises(WeightPatchError, match=r"bad\.jsonl:2: invalid JSON"):
        load_prompts(path)


def test_prompt_files_are_read_by_content(tmp_path):
    """A CSV's header is never a prompt (it was: 4 "prompts" from a 3-row CSV); JSONL is JSONL
    whatever its name; plain text is one prompt per line."""
    table = tmp_path / "p.csv"
    table.write_text('prompt,note\nfirst one,a\n"second, with a comma",b\n"third\nover two lines",c\n')
    records = read_prompt_file(table)
    assert [r.prompt for r in records] == ["first one", "second, with a comma", "third\nover two lines"]
    assert records[0].extra == {"note": "a"}
    headed = tmp_path / "headed.txt"  # a one-column table saved under another name
    headed.write_text("prompt\nhello there\nwrite a poem\n")
    assert [r.prompt for r in read_prompt_file(headed)] == ["hello there", "write a poem"]
    jsonl = tmp_path / "records.txt"
    jsonl.write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list": [], "kwargs": []}) + "\n")
    assert read_prompt_file(jsonl)[0].key == 1
    text = tmp_path / "p.txt"
    text.write_text("one prompt, with a comma\n\nanother\n")
    assert [r.prompt for r in read_prompt_file(text)] == ["one prompt, with a comma", "another"]


def test_a_table_without_a_prompt_column_or_a_binary_file_is_refused(tmp_path):
    table = tmp_path / "p.csv"
    table.write_text("text,label\nhello,1\n")
    with pytest.raises(WeightPatchError, match=r"needs a 'prompt' column \(its header is: text, label\)"):
        read_prompt_file(table)
    binary = tmp_path / "p.parquet"
    binary.write_bytes(b"PAR1\xff\xfe\x00")
    with pytest.raises(WeightPatchError, match=r"not UTF-8 text \(byte 0xff at offset 4\); save it as UTF-8"):
        read_prompt_file(binary)
