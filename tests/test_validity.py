"""The anchor validity check: the warning fires where the anchor is unrelated to the output and not
where it is related; the behaviour objective runs through the screen stage from Python and the CLI."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from conftest import make_pair, save, tiny_model, tiny_texts, write_prompts
from weightpatch import demo
from weightpatch.anchors import build_anchor
from weightpatch.behaviour import BehaviourScorer
from weightpatch.config import AnchorConfig, ScreenConfig
from weightpatch.pair import load_pair
from weightpatch.pipeline import open_pair, run_anchor, run_screen
from weightpatch.report import build_report
from weightpatch.results import ScoreTable
from weightpatch.rundir import RunDir
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.first_order import gradient_scores
from weightpatch.validity import anchor_validity, objective_agreement, validity_verdict


def _misleading_pair(root):
    """A fine-tune whose change below the anchor (layer 1) is a small one in L0's MLP, while its
    output behaviour comes from a large change in the last layer (3), above the anchor."""
    base = tiny_model("llama", num_layers=4)
    sft = tiny_model("llama", num_layers=4)
    sft.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if name.startswith("model.layers.0.mlp."):
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
            elif name.startswith("model.layers.3."):
                p.add_(1.0 * torch.randn(p.shape, generator=generator))
    return save(base, root / "base"), save(sft, root / "sft")


def test_warning_fires_where_the_anchor_is_unrelated_to_the_output(tmp_path):
    pair = load_pair(*_misleading_pair(tmp_path))
    texts = tiny_texts(8, 4)
    anchor = build_anchor(pair, tiny_texts(8, 1), None, layer=1, method="model_diff")
    scorer = AnchorScorer(pair, anchor, texts, min_relative_gap=0.0)
    behaviour = BehaviourScorer(pair, texts, min_relative_gap=0.0, max_new_tokens=4)
    table = gradient_scores(scorer, kinds=("module",), progress=False)
    frame = anchor_validity(scorer, behaviour, table, k=2, controls=5)
    top = frame[frame["selection"] == "top"].iloc[0]
    assert "L0.mlp" in top["components"]
    assert top["anchor"] > 0.8 and top["behaviour"] < 0.3, top
    verdict = validity_verdict(frame)
    assert verdict.status == "misleads" and verdict.warns
    assert verdict.line.startswith("anchor misleads here: top-2 modules by first_order anchor score recover")
    # the controls draw from every module of the model, seeded
    randoms = frame[frame["selection"] == "random"]
    assert len(randoms) == 5
    again = anchor_validity(scorer, behaviour, table, k=2, controls=5)
    assert [list(c) for c in again["components"]] == [list(c) for c in frame["components"]]


def test_patching_every_changed_layer_recovers_both_gaps_exactly(tmp_path):
    pair = load_pair(*_misleading_pair(tmp_path))  # only layers 0 and 3 differ
    texts = tiny_texts(6, 4)
    anchor = build_anchor(pair, tiny_texts(6, 1), None, layer=1, method="model_diff")
    scorer = AnchorScorer(pair, anchor, texts, min_relative_gap=0.0)
    behaviour = BehaviourScorer(pair, texts, min_relative_gap=0.0, max_new_tokens=3)
    table = gradient_scores(scorer, kinds=("layer",), progress=False)
    frame = anchor_validity(scorer, behaviour, table, k=4, controls=3)
    top = frame.iloc[0]
    assert sorted(top["components"]) == ["L0", "L1", "L2", "L3"]
    assert (top["anchor"], top["behaviour"]) == (1.0, 1.0)
    assert len(frame) == 1  # k is the whole kind: no random subset differs from the top-k
    assert validity_verdict(frame).status == "valid"


@pytest.fixture(scope="module")
def demo_anchor(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-validity")
    paths = demo.paths()
    cfg = AnchorConfig(
        base=str(paths.base),
        specialized=str(paths.specialized),
        prompts=demo.prompt_path("anchor"),
        heldout=demo.prompt_path("heldout"),
        steering_prompts=0,
        run_dir=root / "run",
        progress=False,
    )
    pair = open_pair(cfg)
    run_anchor(cfg, pair)
    return pair, cfg, root


def _screen_cfg(demo_anchor, run_dir, **fields) -> ScreenConfig:
    _, acfg, _ = demo_anchor
    return ScreenConfig(
        base=acfg.base, specialized=acfg.specialized, prompts=acfg.heldout, anchor=acfg.run_path / "anchor",
        run_dir=run_dir, progress=False, max_prompts=16, **fields,
    )  # fmt: skip


def test_the_demo_screen_records_the_check_in_both_currencies_and_the_checker(demo_anchor, tmp_path):
    """Every screen ends with the check; its verdict is the rule applied to its own table. (On the demo
    pair all eight attention/MLP blocks recover most of the anchor gap but little of the checker's:
    the blocks alone do not carry the format, so the check warns there - see docs/method.md.)"""
    pair, _, _ = demo_anchor
    result = run_screen(_screen_cfg(demo_anchor, tmp_path / "s", method="first_order", kinds=["module"]), pair)
    run = RunDir(result.run_dir)
    frame = run.load_table("anchor_validity")
    assert result.validity == validity_verdict(frame)
    assert run.record()["anchor_validity"] == {"status": result.validity.status, "line": result.validity.line}
    checker = frame.set_index("selection")["metric"]  # the demo prompts carry IFEval instructions
    assert checker["specialized"] > checker["base"]
    top = frame[frame["selection"] == "top"].iloc[0]
    assert sorted(top["components"]) == sorted(f"L{i}.{m}" for i in range(4) for m in ("attn", "mlp"))
    assert 0.0 < top["anchor"] < 1.0 and 0.0 < top["behaviour"] < 1.0  # the norms and embeddings are left out
    responses = run.load_table("responses")
    assert len(responses) == 16 and run.record()["behaviour"]["responses_sha256"]


def test_behaviour_objective_from_python_and_cli_gives_identical_tables(demo_anchor, tmp_path):
    from typer.testing import CliRunner

    from weightpatch.cli.main import app

    pair, acfg, _ = demo_anchor
    fields = {"method": "verify", "kinds": ["module"], "top_k": 3, "objective": "behaviour", "validity_k": 0}
    python = run_screen(_screen_cfg(demo_anchor, tmp_path / "py", **fields), pair)
    assert set(python.scores.frame["method"]) == {"first_order", "exact"}
    assert RunDir(python.run_dir).record()["screening"]["objective"] == "behaviour"
    words = [
        "screen", acfg.base, acfg.specialized, "--prompts", acfg.heldout, "--anchor", acfg.run_path / "anchor",
        "--kinds", "module", "--top-k", "3", "--objective", "behaviour", "--validity-k", "0", "--max-prompts", "16",
        "--run-dir", tmp_path / "cli", "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(app, [str(w) for w in words])
    assert result.exit_code == 0, result.output
    cli = RunDir(tmp_path / "cli").scores().frame.sort_values(["method", "component"]).reset_index(drop=True)
    ours = python.scores.frame.sort_values(["method", "component"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(cli, ours)


def test_behaviour_objective_refuses_the_engines_it_has_not(demo_anchor, tmp_path):
    with pytest.raises(ValueError, match="no local_exact screen"):
        _screen_cfg(demo_anchor, tmp_path / "x", objective="behaviour", method="local_exact")
    with pytest.raises(ValueError, match="local backend only"):
        _screen_cfg(demo_anchor, tmp_path / "x", objective="behaviour", backend="ray")


def test_a_screen_of_the_tiny_pair_records_the_check(llama_pair_dirs, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    base, sft = map(str, llama_pair_dirs)
    acfg = AnchorConfig(base=base, specialized=sft, prompts=prompts, steering_prompts=0, run_dir=tmp_path / "run")
    pair = open_pair(acfg)
    run_anchor(acfg, pair)
    cfg = ScreenConfig(
        base=base, specialized=sft, prompts=prompts, anchor=acfg.run_path / "anchor", run_dir=tmp_path / "s",
        progress=False, method="first_order", kinds=["head"], validity_k=3, validity_controls=5,
    )  # fmt: skip
    result = run_screen(cfg, pair)
    frame = RunDir(result.run_dir).load_table("anchor_validity")
    # the prompts carry IFEval instructions: the checker's base and specialized reference rows follow
    assert list(frame["selection"]) == ["top"] + ["random"] * 5 + ["base", "specialized"]
    assert set(frame["kind"]) == {"head"} and list(frame["k"]) == [3] * 6 + [0, 0]


def test_agreement_of_a_table_with_itself_and_with_its_reverse(tmp_path):
    pair = load_pair(*make_pair("llama", tmp_path, num_layers=4))
    anchor = build_anchor(pair, tiny_texts(6, 1), None, layer=3, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 4), min_relative_gap=0.0)
    table = gradient_scores(scorer, kinds=("head", "layer"), progress=False)
    same = objective_agreement(table, table, k=3)
    assert (same["spearman"] == 1.0).all() and (same["overlap"] == same["k"]).all()
    assert set(same.loc[same["layer"].isna(), "kind"]) == {"head", "layer"}
    assert set(same.loc[same["kind"] == "head", "layer"].dropna()) == {0.0, 1.0, 2.0, 3.0}  # 4 heads per layer
    reversed_ = ScoreTable(table.frame.assign(score=-table.frame["score"].rank()))
    heads = objective_agreement(table, reversed_).set_index(["kind", "layer"])
    assert heads.loc[("head", 0.0), "spearman"] == pytest.approx(-1.0)


def test_behaviour_run_compares_the_objectives_and_the_report_shows_it(demo_anchor, tmp_path):
    pair, _, _ = demo_anchor
    cfg = _screen_cfg(demo_anchor, tmp_path / "b", method="first_order", kinds=["module"], objective="behaviour",
                      validity_k=4, validity_controls=5)  # fmt: skip
    result = run_screen(cfg, pair)
    run = RunDir(result.run_dir)
    curves = run.load_table("currency_curves")
    assert set(curves["ranking"]) == {"anchor", "behaviour"} and sorted(set(curves["k"])) == [1, 2, 4]
    validity = run.load_table("anchor_validity")
    # the validity check ranks by the run's objective: its top-4 is the behaviour curve's k=4 point
    top = validity[validity["selection"] == "top"].iloc[0]
    point = curves[(curves["ranking"] == "behaviour") & (curves["k"] == 4)].iloc[0]
    assert list(top["components"]) == list(point["components"])
    assert (top["anchor"], top["behaviour"]) == (point["anchor"], point["behaviour"])
    assert "by first_order behaviour score" in result.validity.line
    html = build_report(result.run_dir).read_text()
    assert "Anchor vs behaviour objective" in html and "Anchor validity" in html
    assert result.validity.line.split(":")[0] in html


def test_the_verdict_reads_the_checker_where_the_prompts_carry_instructions():
    """The caps fine-tune's case (SmolLM2-135M, anchor layer 16): the top-16 blocks recover 0.92 of
    the anchor gap and 0.56 of the teacher-forced behaviour gap, but write all capitals on 0.06 of the
    prompts (base 0.00, fine-tune 0.81): the checker's 0.08 of its gap decides, and the anchor misleads."""
    rows = [
        {"selection": "top", "draw": 0, "k": 16, "kind": "module", "method": "first_order", "anchor": 0.92,
         "behaviour": 0.56, "metric": 0.0625},
        {"selection": "random", "draw": 0, "k": 16, "kind": "module", "method": "first_order", "anchor": 0.38,
         "behaviour": 0.61, "metric": 0.0},
        {"selection": "base", "draw": 0, "k": 0, "kind": "module", "method": "first_order", "anchor": 0.0,
         "behaviour": 0.0, "metric": 0.0},
        {"selection": "specialized", "draw": 0, "k": 0, "kind": "module", "method": "first_order", "anchor": 1.0,
         "behaviour": 1.0, "metric": 0.8125},
    ]  # fmt: skip
    verdict = validity_verdict(pd.DataFrame(rows))
    assert verdict.status == "misleads"
    assert "checker 0.06 (base 0.00, specialized 0.81), 0.08 of its gap" in verdict.line
    without_checker = pd.DataFrame(rows).drop(columns=["metric"])
    assert validity_verdict(without_checker).status == "valid"  # the teacher-forced 0.56 alone passes


def test_trace_runs_under_the_behaviour_objective_and_a_run_keeps_one_objective(llama_pair_dirs, tmp_path):
    """``run_trace(objective="behaviour")``: its activation scores are the behaviour objective's
    (equal to scoring the run's responses directly), every trace table is written, and a run
    directory holding behaviour scores refuses a stage under the anchor objective."""
    from weightpatch.activation import activation_scores
    from weightpatch.config import TraceConfig
    from weightpatch.errors import WeightPatchError
    from weightpatch.pipeline import run_trace

    prompts = write_prompts(tmp_path / "p.jsonl")
    base, sft = map(str, llama_pair_dirs)
    acfg = AnchorConfig(base=base, specialized=sft, prompts=prompts, steering_prompts=0, run_dir=tmp_path / "run")
    pair = open_pair(acfg)
    run_anchor(acfg, pair)
    shared = {"base": base, "specialized": sft, "prompts": prompts, "run_dir": tmp_path / "run", "progress": False}
    cfg = TraceConfig(**shared, objective="behaviour", response_tokens=4, random_controls=5, first_order_stderr=False)
    result = run_trace(cfg, pair)
    run = RunDir(result.run_dir)
    assert run.record()["objective"] == "behaviour"
    assert all(run.has(t) for t in ("roles", "supplier_edges", "hierarchy", "sufficiency", "necessity"))
    saved = run.load_table("responses")
    responses = [[int(t) for t in r] for r in saved["response_ids"]]
    scorer = BehaviourScorer(pair, list(saved["prompt"]), responses, min_relative_gap=cfg.min_relative_gap)
    traced = result.scores.select("activation").frame.set_index("component")["score"]
    names = ["L0.attn", "L1.mlp", "L1.attn.head1"]
    direct = activation_scores(scorer, names).frame.set_index("component")["score"]
    assert traced.loc[names].to_numpy() == pytest.approx(direct.loc[names].to_numpy(), abs=1e-6)
    screen = ScreenConfig(**shared, method="first_order", kinds=["head"], validity_k=0)
    with pytest.raises(WeightPatchError, match="holds scores under the behaviour objective; run with --objective"):
        run_screen(screen, pair)
