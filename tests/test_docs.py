"""The Python recipes in docs/patterns.md run as written, on the embedded demo pair."""

import re
from pathlib import Path

import pytest

from weightpatch import demo

DOCS = Path(__file__).parents[1] / "docs" / "patterns.md"


def test_pattern_recipes_run_on_the_demo_pair(tmp_path, monkeypatch, caplog):
    paths = demo.paths()
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 6
    code = "\n".join(blocks)
    code = code.replace('"path/or/hub-id-of-base"', repr(str(paths.base)))
    code = code.replace('"path/or/hub-id-of-specialized"', repr(str(paths.specialized)))
    # the merge recipes: two experts (the specialized model twice), each with the scores saved above
    for name, path in (('"base"', paths.base), ('"expert_a"', paths.specialized), ('"expert_b"', paths.specialized)):
        code = code.replace(name, repr(str(path)))
    code = code.replace('"runs/a"', '"runs/scores.parquet"').replace('"runs/b"', '"runs/scores.parquet"')
    code = code.replace('"prompts.jsonl"', repr(str(demo.prompt_path("anchor"))))
    namespace: dict = {}
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="weightpatch"):
        exec(compile(code, str(DOCS), "exec"), namespace)
    assert "without the chat template" not in caplog.text  # the recipes render as the stages do
    assert "lie inside other ranked ones" not in caplog.text  # and rank disjoint components
    assert (tmp_path / "runs" / "scores.parquet").is_file()
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    owned = namespace["merger"]
    assert all(chosen and all(re.fullmatch(r"L\d+\.(attn|mlp)", c) for c in chosen) for chosen in owned.selected)
    assert (tmp_path / "merged-owned" / "README.md").is_file() and (tmp_path / "merged-owned.yml").is_file()


README = Path(__file__).parents[1] / "README.md"


def run_readme_python(tmp_path, monkeypatch) -> dict:
    section = README.read_text().split("## Python", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_readme_python_runs_as_written_with_the_demo_configs(tmp_path, monkeypatch):
    """The README's Python section runs unchanged, and its stage configs are the demo's (so the
    demo, which runs the same stage functions, gives the same numbers: the slow test below checks)."""
    from weightpatch.pipeline import demo_configs

    namespace = run_readme_python(tmp_path, monkeypatch)
    # the section's second block reads a finished run back: here the run the first block made
    reader = re.findall(r"```python\n(.*?)```", README.read_text().split("## Python", 1)[1], flags=re.S)[1]
    assert '"wpatch-runs/demo"' in reader
    exec(compile(reader.replace('"wpatch-runs/demo"', '"wpatch-runs/python"'), str(README), "exec"), namespace)
    assert namespace["run"].findings()
    verified = namespace["result"].verified
    assert {"component", "first_order", "exact"} <= set(verified.columns) and len(verified) == 3 * 8
    demo = demo_configs()
    for ours, theirs in ((namespace["anchor_cfg"], demo.anchor), (namespace["screen_cfg"], demo.screen)):
        assert ours.model_dump(exclude={"run_dir"}) == theirs.model_dump(exclude={"run_dir"})


@pytest.mark.slow  # runs the whole demo (~40 s of CPU)
def test_readme_python_gives_exactly_the_demo_scores(tmp_path, monkeypatch):
    import pandas as pd
    from typer.testing import CliRunner

    from weightpatch.cli.main import app
    from weightpatch.results import ScoreTable

    run_readme_python(tmp_path, monkeypatch)
    result = CliRunner().invoke(app, ["demo", "--run-dir", "demo-run", "--steering-prompts", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    cli = ScoreTable.load(tmp_path / "demo-run" / "scores.parquet").frame
    python = ScoreTable.load(tmp_path / "wpatch-runs" / "python" / "scores.parquet").frame
    keys = ["component", "method"]
    cli = cli[cli["method"].isin(["exact", "first_order"])].set_index(keys)
    python = python.set_index(keys)
    common = python.index.intersection(cli.index)
    assert len(common) == len(python) and python["score"].notna().all()
    pd.testing.assert_frame_equal(python.loc[common].sort_index(), cli.loc[common].sort_index(), check_exact=True)


def test_nothing_refers_to_files_outside_the_repository():
    """Docs and docstrings cite docs/method.md (or the paper), never a file a user of the repository lacks."""
    root = Path(__file__).parents[1]
    files = [*root.glob("*.md"), *(root / "docs").glob("*.md"), *(root / "src").rglob("*.py")]
    for path in files:
        text = path.read_text()
        for needle in ("../shared", "SPEC section", "SPEC.md"):
            assert needle not in text, f"{path.relative_to(root)} refers to {needle}"
    sections = re.findall(r'docs/method\.md, "([^"]+)"', "".join(p.read_text() for p in files))
    headings = set(re.findall(r"^##+ (?:\d+\. )?(.+)$", (root / "docs" / "method.md").read_text(), flags=re.M))
    assert sections and set(sections) <= headings, set(sections) - headings


DEMO_STUDY = Path(__file__).parents[1] / "docs" / "demo-study.md"


@pytest.mark.slow  # the demo's anchor, screen and trace stages (~1 min of CPU)
def test_demo_study_page_runs_and_draws_its_figures(tmp_path, monkeypatch):
    code = "\n".join(re.findall(r"```python\n(.*?)```", DEMO_STUDY.read_text(), flags=re.S))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-study").mkdir()
    namespace: dict = {}
    exec(compile(code, str(DEMO_STUDY), "exec"), namespace)
    for image in re.findall(r"!\[[^]]*\]\((demo-study/[^)]+)\)", DEMO_STUDY.read_text()):
        assert (tmp_path / image).stat().st_size > 10_000, image  # drawn by the page's own cells
        assert (DEMO_STUDY.parent / image).is_file(), image  # and shipped with the page
    assert len(namespace["screen"].scores.select("exact")) == 24  # top 8 of heads, modules, neurons
