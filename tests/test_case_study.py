"""The case study page (docs/case-study.md) cannot drift from its numbers: it re-renders identically
from the committed tables, and the claims computed from a run's tables equal independent
re-computations on a small run (benchmarks/case_study.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import make_pair, write_prompts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
case_study = pytest.importorskip("case_study")


def test_the_committed_page_is_rendered_from_the_committed_tables():
    page = case_study.render_page(ROOT / "docs" / "case-study" / "data")
    assert (ROOT / "docs" / "case-study.md").read_text() == page


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The case study's pipeline on a tiny llama pair: run directory and extracted tables."""
    root = tmp_path_factory.mktemp("case")
    base, sft = make_pair("llama", root, scale=0.2, num_layers=4)
    anchor_file = write_prompts(root / "anchor.jsonl", n=16, seed=0)
    heldout_file = write_prompts(root / "heldout.jsonl", n=12, seed=1)
    run_dir = root / "run"
    case_study.run_pipeline(anchor_file, heldout_file, base, sft, run_dir)
    case_study.extract(run_dir, root / "tables")
    return run_dir, root / "tables"


@pytest.mark.slow
def test_claims_equal_independent_computations_on_a_small_run(small_run):
    run_dir, tables = small_run
    found = case_study.claims(tables)
    scores = pd.read_parquet(run_dir / "scores.parquet").drop_duplicates(["method", "component"])
    anchor = json.loads((run_dir / "anchor.json").read_text())
    assert found["anchor"]["layer"] == anchor["layer"]
    # depth: median layer of the 20 largest first-order neuron scores, from the full score table
    neurons = scores[(scores["method"] == "first_order") & (scores["kind"] == "neuron")]
    top = neurons.sort_values("score", ascending=False).head(20)
    assert found["depth"]["weight neurons (first order)"]["median_layer"] == pytest.approx(np.median(top["layer"]))
    # overlap: traced suppliers (max supply over targets) against the top-k first-order neurons
    edges = pd.read_parquet(run_dir / "supplier_edges.parquet")
    edges = edges[edges["supplier_kind"] == "neuron"]
    for k, fraction in found["overlap"].items():
        traced = edges.groupby("supplier")["supply"].max().nlargest(k).index
        wp = set(neurons.nlargest(k, "score")["component"])
        assert fraction == pytest.approx(len(set(traced) & wp) / len(traced))
    # roles: counts per kind straight from the roles table
    roles = pd.read_parquet(run_dir / "roles.parquet")
    heads = roles[roles["kind"] == "head"]["role"].astype(str).value_counts()
    assert found["roles"]["head:attn"]["router"] == heads.get("router", 0)
    # behaviour: the base and specialized strict accuracies bound the table; recovery of the largest k
    behaviour = pd.read_parquet(run_dir / "behavior.parquet")
    models = behaviour[behaviour["ranking"] == "model"].set_index("draw")["strict"]
    assert found["behaviour"]["specialized_strict"] == models["specialized"]
    # size: per-parameter scores are the exact scores over the slice sizes
    size = pd.read_parquet(run_dir / "size_fair.parquet")
    assert np.allclose(size["per_million_params"], size["exact"] / size["params"] * 1e6)
    head = size[size["kind"] == "head"]
    if len(head):
        assert found["size_fair"]["head"]["best_exact"] == pytest.approx(head["exact"].max())
    assert stats is not None


@pytest.mark.slow
def test_a_neuron_group_is_the_size_of_a_head(small_run):
    run_dir, _ = small_run
    size = pd.read_parquet(run_dir / "size_fair.parquet")
    group = size[size["kind"] == "neuron_group"]
    head = size[size["kind"] == "head"]
    assert len(group) and len(head)
    # a head-sized group: within one neuron of a head's parameter count
    neuron = size[size["kind"] == "neuron"]["params"].iloc[0]
    assert abs(group["params"].iloc[0] - head["params"].iloc[0]) <= neuron


def test_the_if_capabilitys_prompt_files_are_held_out_and_checkable(tmp_path):
    """The IF expert's prompt files: IFEval records the built-in checkers verify, 12 held-out prompts
    per constraint from the test split (no prompt shared with the anchor set), each prompt its plain
    question plus the instruction."""
    from weightpatch.checkers import follows
    from weightpatch.prompts import read_prompt_file

    anchor_file, heldout_file = case_study.write_prompt_files("if-behaviour", tmp_path)
    anchor, heldout = read_prompt_file(anchor_file), read_prompt_file(heldout_file)
    ids = [r.instruction_id_list[0] for r in heldout]
    assert len(heldout) == 36 and {i: ids.count(i) for i in set(ids)} == {
        "change_case:english_capital": 12,
        "startend:quotation": 12,
        "punctuation:no_comma": 12,
    }
    assert not {r.prompt for r in anchor} & {r.prompt for r in heldout}
    assert {r.instruction_id_list[0] for r in anchor} == set(ids) and len(anchor) >= 60
    for r in anchor + heldout:
        assert r.prompt.startswith(r.prompt_without_instruction + " ") and r.prompt != r.prompt_without_instruction
    assert follows("startend:quotation", '"yes"', {}) and not follows("punctuation:no_comma", "a, b", {})
