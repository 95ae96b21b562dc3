"""Merge evaluation table on tiny pairs: rows, base = 0 / expert = 1 recovery, a one-expert merge."""

from __future__ import annotations

import math

import pytest

from conftest import perturbed_copy, save, tiny_model, tiny_texts
from weightpatch.checkers import check_end_phrase
from weightpatch.merging.evaluate import (
    build_capability,
    default_mergers,
    evaluate_models,
    merge_report,
    strict_prompt_accuracy,
    wide_table,
)
from weightpatch.merging.methods import MergeConfig
from weightpatch.merging.stream import merge_checkpoints


def _records(texts):
    return [{"key": i, "prompt": t, "instruction_id_list": [], "kwargs": []} for i, t in enumerate(texts)]


def _nonempty(records, responses):
    return sum(bool(r.strip()) for r in responses) / len(responses)


@pytest.fixture(scope="module")
def tiny_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-eval")
    base = tiny_model("llama")
    a = perturbed_copy(base, 0.05, seed=1)
    b = perturbed_copy(base, 0.05, seed=2)
    return save(base, root / "base"), save(a, root / "a"), save(b, root / "b"), root


@pytest.fixture(scope="module")
def capabilities(tiny_experts):
    base, a, b, _ = tiny_experts
    caps = []
    for name, expert, seed in (("a", a, 0), ("b", b, 1)):
        texts = tiny_texts(8, seed=seed)
        caps.append(
            build_capability(
                name, base, expert, texts, layer=1, records=_records(texts[:4]), checker=_nonempty, max_new_tokens=4
            )
        )
    return caps


def test_table_rows_and_own_anchor_recovery(tiny_experts, capabilities, tmp_path):
    base = tiny_experts[0]
    scores = [{"L0.attn.head1": 1.0, "L1.mlp": 0.5}, {"L2.mlp.neuron3": 2.0, "L0.attn": 1.0}]
    table = merge_report(capabilities, base, tmp_path / "merges", scores=scores, top_k=2)
    models = ["base", "expert:a", "expert:b"] + [f"merge:{m}" for m in default_mergers(base, scores)]
    assert list(dict.fromkeys(table["model"])) == models
    assert models[3:] == [
        f"merge:{m}" for m in ("task_arithmetic", "ties", "dare_ties", "owner_takes_top", "score_weighted")
    ]
    assert len(table) == len(models) * 2
    by = table.set_index(["model", "capability"])
    for cap in ("a", "b"):
        assert by.loc[("base", cap), "anchor_recovery"] == pytest.approx(0.0, abs=1e-6)
        assert by.loc[(f"expert:{cap}", cap), "anchor_recovery"] == pytest.approx(1.0, abs=1e-5)
        assert by.loc[(f"expert:{cap}", cap), "kl_to_expert"] == pytest.approx(0.0, abs=1e-6)
        assert by.loc[("base", cap), "kl_to_expert"] > 0
    assert table["strict_accuracy"].between(0, 1).all()
    assert table["anchor_recovery"].map(math.isfinite).all()
    wide = wide_table(table)
    assert list(wide["model"]) == models
    assert "a anchor_recovery" in wide.columns and "b kl_to_expert" in wide.columns


def test_one_expert_task_arithmetic_reproduces_the_expert(tiny_experts, capabilities, tmp_path):
    base, a, _, _ = tiny_experts
    merged = merge_checkpoints(base, [a], tmp_path / "ta", MergeConfig("task_arithmetic", weights=(1.0,)))
    table = evaluate_models(capabilities[:1], {"merged": merged}, behaviour=False)
    row = table.iloc[0]
    assert row["anchor_recovery"] == pytest.approx(1.0, abs=1e-5)
    assert row["kl_to_expert"] == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(row["strict_accuracy"])


def test_strict_accuracy_dispatches_end_checker():
    records = [
        {
            "key": 1,
            "prompt": "p",
            "instruction_id_list": ["startend:end_checker"],
            "kwargs": [{"end_phrase": "Any other questions?"}],
        },
        {"key": 2, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ]
    assert strict_prompt_accuracy(records, ['"the end. any other questions?"', "a, b"]) == 0.5
    assert check_end_phrase("x Any other questions?  ", "Any other questions?")
    assert not check_end_phrase("Any other questions? yes", "Any other questions?")


def test_cli_merge_evaluate_prompts(tiny_experts, tmp_path):
    import json

    import pandas as pd
    from typer.testing import CliRunner

    from weightpatch.cli.main import app

    base, a, _, _ = tiny_experts
    prompts = tmp_path / "p.jsonl"
    texts = tiny_texts(6, seed=3)
    prompts.write_text(
        "".join(
            json.dumps({"key": i, "prompt": t + " z", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}],
                        "prompt_without_instruction": t}) + "\n"
            for i, t in enumerate(texts)
        )
    )  # fmt: skip
    run = tmp_path / "run"
    args = ["merge", str(base), str(a), "-o", str(tmp_path / "m"), "--evaluate-prompts", str(prompts)]
    result = CliRunner().invoke(app, [*args, "--run-dir", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(run / "merge_evaluation.parquet")
    assert list(table["model"]) == ["base", "expert:0:a", "merged"]
    assert table["anchor_recovery"].tolist() == pytest.approx([0.0, 1.0, 1.0], abs=1e-5)
