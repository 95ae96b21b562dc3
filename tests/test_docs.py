"""The Python recipes in docs/patterns.md run as written, on the embedded demo pair."""

import re
from pathlib import Path

from weightpatch import demo

DOCS = Path(__file__).parents[1] / "docs" / "patterns.md"


def test_pattern_recipes_run_on_the_demo_pair(tmp_path, monkeypatch):
    paths = demo.paths()
    records = demo.prompts("anchor")[:24]
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 6
    code = "\n".join(blocks)
    code = code.replace('"path/or/hub-id-of-base"', repr(str(paths.base)))
    code = code.replace('"path/or/hub-id-of-specialized"', repr(str(paths.specialized)))
    code = code.replace(
        '"base", ["expert_a", "expert_b"], "merged"', f'{str(paths.base)!r}, [{str(paths.specialized)!r}], "merged"'
    )
    namespace = {
        "train_with": [r.prompt for r in records[:12]],
        "train_without": [r.prompt_without_instruction for r in records[:12]],
        "heldout_with": [r.prompt for r in records[12:]],
        "heldout_without": [r.prompt_without_instruction for r in records[12:]],
        "prompts": [r.prompt for r in records[:8]],
    }
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOCS), "exec"), namespace)
    assert (tmp_path / "runs" / "scores.parquet").is_file()
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
