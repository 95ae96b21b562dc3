"""The paper-setting merge benchmark's own machinery (benchmarks/paper_merge): the code sandbox refuses
what a generated program must not do and reports it as a failed item, the data splits are disjoint and
their targets satisfy their own checks, and the paired bootstrap matches a hand computation."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
data = pytest.importorskip("paper_merge.data")
sandbox = pytest.importorskip("paper_merge.sandbox")
stats = pytest.importorskip("paper_merge.stats")

TESTS = [((1,), 2), ((5,), 6)]


def test_sandbox_passes_a_correct_function_and_fails_a_wrong_one():
    assert sandbox.run_tests("def f(x):\n    return x + 1\n", "f", TESTS).ok
    wrong = sandbox.run_tests("def f(x):\n    return x + 2\n", "f", TESTS)
    assert (wrong.ok, wrong.passed, wrong.total, wrong.error) == (False, 0, 2, "")
    broken = sandbox.run_tests("def f(x) return", "f", TESTS)
    assert not broken.ok and "SyntaxError" in broken.error


def test_sandbox_refuses_writing_outside_its_directory(tmp_path):
    target = tmp_path / "outside.txt"
    for program in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.rename('a', {str(target)!r})",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.system('touch {target}')",
        f"import subprocess\nsubprocess.run(['touch', {str(target)!r}])",
    ):
        outcome = sandbox.run_tests(program + "\ndef f(x):\n    return x + 1\n", "f", TESTS)
        assert not outcome.ok and "refused" in outcome.error, (program, outcome)
    assert not target.exists()
    # its own directory is writable
    inside = sandbox.run_tests("open('scratch.txt', 'w').write('x')\ndef f(x):\n    return x + 1\n", "f", TESTS)
    assert inside.ok


def test_sandbox_refuses_sockets():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\ndef f(x):\n    return x + 1\n"
        outcome = sandbox.run_tests(program, "f", TESTS)
        assert not outcome.ok and "refused" in outcome.error
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody connected
    finally:
        listener.close()


def test_sandbox_stops_an_endless_loop_as_a_failed_item():
    start = time.monotonic()
    outcome = sandbox.run_tests("def f(x):\n    while True:\n        pass\n", "f", TESTS, timeout=1.0)
    assert not outcome.ok and "timeout" in outcome.error
    assert time.monotonic() - start < 10


def test_splits_are_disjoint_in_templates_topics_and_operands():
    assert not set(data.IF_TOPICS["train"]) & set(data.IF_TOPICS["test"])
    assert not set(data.IF_TEMPLATES["train"]) & set(data.IF_TEMPLATES["test"])
    prompts = {split: {it.prompt for it in data.math_items(split)} for split in data.SPLITS}
    assert not prompts["train"] & prompts["test"] and not prompts["val"] & prompts["test"]
    code = {split: {it.prompt for it in data.code_items(split)} for split in data.SPLITS}
    assert not code["train"] & code["test"]
    items = data.if_items("test")
    assert sum(it.constraint is None for it in items) == len(items) // 3
    assert len(data.math_items("test")) >= 200 and len(data.code_items("test")) >= 200
    assert sum(it.constraint is not None for it in items) >= 200


def test_targets_satisfy_their_own_checks():
    answer = "Penguins, like many birds, waddle on the ice."
    for name in data.IF_CONSTRAINTS:
        item = data.Item("if", "p", constraint=name)
        assert data.if_correct(item, data.if_target(answer, name)), name
        assert not data.if_correct(item, answer), name  # the plain answer satisfies none of them
    assert not data.false_format(answer)
    for it in data.math_items("train")[:8]:
        assert data.math_correct(it, it.target)
        assert not data.math_correct(it, it.target.replace(str(it.answer), str(it.answer + 1)))
    for it in data.code_items("test")[::40]:  # the reference passes its hidden tests in the sandbox
        assert sandbox.run_tests(data.extract_code(it.target), it.entry, it.tests).ok, it.prompt


def test_paired_bootstrap_matches_a_hand_computation():
    a, b = [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]  # d = [1, 0, -1]
    resamples = [np.array([[0, 0, 0], [0, 1, 2], [2, 2, 1], [1, 1, 1]])]
    # replicate means [1, 0, -2/3, 0]; sorted [-2/3, 0, 0, 1]; linear quantiles at positions
    # 0.025 * 3 = 0.075 and 0.975 * 3 = 2.925
    out = stats.paired_bootstrap([(a, b, 1.0)], resamples=resamples)
    assert out.diff == 0.0
    assert out.low == pytest.approx(-2 / 3 + 0.075 * 2 / 3)
    assert out.high == pytest.approx(0.925)
    assert not out.excludes_zero
    # two groups with scales: the mean of the normalized per-group statistics
    two = stats.paired_bootstrap(
        [(a, b, 1.0), ([1.0, 1.0], [0.0, 0.0], 0.5)], resamples=[resamples[0], np.zeros((4, 2), dtype=int)]
    )
    assert two.diff == pytest.approx(1.0)  # (0 + 2) / 2
    assert two.low == pytest.approx((-2 / 3 + 0.075 * 2 / 3 + 2) / 2)
    seeded = stats.paired_bootstrap([(a, b, 1.0)], seed=3)
    assert seeded == stats.paired_bootstrap([(a, b, 1.0)], seed=3)


def _row(name, mean, correct_if, correct_math):
    return {
        "row": name,
        "mean_normalized": mean,
        "normalized": {"if": mean, "math": mean},
        "test": {"skills": {"if": {"correct": correct_if}, "math": {"correct": correct_math}}},
    }


def test_the_verdict_follows_the_rule_fixed_in_advance():
    table = pytest.importorskip("paper_merge.table")
    ref = {"if": {"base": 0.0, "expert": 1.0}, "math": {"base": 0.0, "expert": 1.0}}
    n = 60
    strong, weak = [True] * n, [True] * (n // 2) + [False] * (n // 2)
    skills = ("if", "math")

    def combo(guided, magnitude, random_):
        rows = [
            _row("task_arithmetic", 0.5, weak, weak),
            _row("stitch:weight_patching", guided, *(strong, strong) if guided > 0.5 else (weak, weak)),
            _row("stitch:magnitude", magnitude, weak, weak),
            _row("stitch:random", random_, weak, weak),
        ]
        return rows, skills, ref

    # WP stitch beats the best baseline by 0.5 (every bootstrap replicate > 0) and its controls: reproduced
    tables = {"a": combo(1.0, 0.5, 0.5), "b": combo(1.0, 0.5, 0.5), "c": combo(0.5, 0.5, 0.5)}
    assert table.verdict(tables)[0] == "reproduced"
    # the same wins over the baselines, but magnitude scores do as well: rule, not scores
    tables = {"a": combo(1.0, 1.0, 0.5), "b": combo(1.0, 1.0, 0.5)}
    assert table.verdict(tables)[0] == "rule, not scores"
    # one combination only: refuted
    assert table.verdict({"a": combo(1.0, 0.5, 0.5), "b": combo(0.5, 0.5, 0.5)})[0] == "refuted"
    # no baseline keeps half of every skill: the gate fails
    rows, _, _ = combo(1.0, 0.5, 0.5)
    rows[0]["normalized"] = {"if": 0.9, "math": 0.2}
    name, notes = table.verdict({"a": (rows, skills, ref)})
    assert name == "not mergeable" and "gate" in notes[-1]
