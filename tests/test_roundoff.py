"""The bfloat16 round-off warning (pipeline.inputs.roundoff_warning): it fires when the anchor gap of a
16-bit model is within the rounding of its residual stream, not when the gap is well above it, never
for float32, and the screen stage logs it."""

from __future__ import annotations

import logging

import pytest

from conftest import make_pair, write_prompts
from weightpatch.anchors import build_anchor
from weightpatch.config import ScreenConfig
from weightpatch.pair import load_pair
from weightpatch.pipeline import run_screen
from weightpatch.pipeline.inputs import roundoff_warning
from weightpatch.prompts import load_prompts
from weightpatch.scoring import AnchorScorer

# Gaussian weight noise of the specialized model: 1e-4 gives a bfloat16 anchor gap of about half the
# round-off eps x ||h|| on the tiny Llama, 1e-3 about 7 times it (measured while writing this test).
WITHIN, ABOVE = 1e-4, 1e-3


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = write_prompts(tmp_path_factory.mktemp("roundoff") / "p.jsonl", n=8)
    return path, [r.prompt for r in load_prompts(path)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, prompts):
    """noise scale -> (base dir, specialized dir, float32 model-difference anchor at layer 1)."""
    out = {}
    for scale in (WITHIN, ABOVE):
        base, sft = make_pair("llama", tmp_path_factory.mktemp(f"noise{scale}"), scale=scale)
        anchor = build_anchor(load_pair(base, sft), prompts[1], None, 1, method="model_diff", batch_size=8)
        out[scale] = (base, sft, anchor)
    return out


def scorer(pairs, prompts, scale: float, dtype: str) -> AnchorScorer:
    base, sft, anchor = pairs[scale]
    return AnchorScorer(load_pair(base, sft, dtype=dtype), anchor, prompts[1], batch_size=8)


def test_warns_when_the_bfloat16_gap_is_within_round_off(pairs, prompts):
    message = roundoff_warning(scorer(pairs, prompts, WITHIN, "bfloat16"))
    assert message is not None
    assert "within bfloat16 round-off" in message and "--dtype float32" in message and "\n" not in message


def test_no_warning_when_the_gap_is_above_round_off(pairs, prompts):
    assert roundoff_warning(scorer(pairs, prompts, ABOVE, "bfloat16")) is None


def test_no_warning_in_float32(pairs, prompts):
    assert roundoff_warning(scorer(pairs, prompts, WITHIN, "float32")) is None


def test_screen_stage_logs_the_warning(pairs, prompts, tmp_path, caplog):
    base, sft, anchor = pairs[WITHIN]
    anchor.save(tmp_path / "anchor")
    cfg = ScreenConfig(
        base=str(base), specialized=str(sft), prompts=prompts[0], anchor=tmp_path / "anchor", dtype="bfloat16",
        method="first_order", kinds=["module"], run_dir=tmp_path / "run", progress=False,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="weightpatch"):
        run_screen(cfg)
    assert any("within bfloat16 round-off" in r.getMessage() for r in caplog.records)
