"""``wpatch screen --backend``: local by default, Ray on request, and a run started on one backend
resumes on the other (the backend does not change results, so it is not part of the run's identity)."""

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_texts
from weightpatch.cli.main import app
from weightpatch.results import ScoreTable
from weightpatch.rundir import RunDir


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("backend-prompts") / "prompts.jsonl"
    with path.open("w") as f:
        for i, body in enumerate(tiny_texts(12, seed=3)):
            record = {"key": i, "prompt": f"{body} no comma please", "instruction_id_list": ["punctuation:no_comma"]}
            f.write(json.dumps({**record, "kwargs": [{}], "prompt_without_instruction": body}) + "\n")
    return path


@pytest.fixture
def run_with_anchor(llama_pair_dirs, prompts, tmp_path):
    run = tmp_path / "run"
    result = invoke(
        "anchor", *llama_pair_dirs, "--prompts", prompts, "--layer", "2", "--steering-prompts", "0", "--run-dir", run
    )
    assert result.exit_code == 0, result.output
    return run


COMPONENTS = "L0.mlp,L1.attn.head1,L2.attn,embed," + ",".join(f"L1.mlp.neuron{j}" for j in range(0, 48, 5))


def screen(pair_dirs, prompts, run, *extra):
    args = ("screen", *pair_dirs, "--prompts", prompts, "--method", "exact", "--components", COMPONENTS)
    result = invoke(*args, "--run-dir", run, "--no-progress", *extra)
    assert result.exit_code == 0, result.output
    return ScoreTable.load(run / "scores.parquet").select("exact").frame.set_index("component")


def test_local_backend_is_the_default_and_resumes(llama_pair_dirs, prompts, run_with_anchor):
    run = run_with_anchor
    first = screen(llama_pair_dirs, prompts, run)
    assert sorted(first.index) == sorted(COMPONENTS.split(","))
    RunDir(run).save_table("scores", ScoreTable.load(run / "scores.parquet").frame.iloc[3:])
    again = screen(llama_pair_dirs, prompts, run, "--backend", "local")
    assert "local backend): 3 components to score" in (run / "log.txt").read_text()
    pd.testing.assert_series_equal(again.loc[first.index, "score"], first["score"])


def test_bad_backend_is_a_user_error(llama_pair_dirs, prompts, run_with_anchor):
    args = ("--prompts", prompts, "--backend", "spark", "--run-dir", run_with_anchor)
    result = invoke("screen", *llama_pair_dirs, *args)
    assert result.exit_code == 2 and "backend" in result.stderr


@pytest.mark.slow
def test_ray_backend_resumes_a_local_run_with_the_same_scores(llama_pair_dirs, prompts, run_with_anchor):
    pytest.importorskip("ray")
    run = run_with_anchor
    first = screen(llama_pair_dirs, prompts, run)
    RunDir(run).save_table("scores", ScoreTable.load(run / "scores.parquet").frame.iloc[5:])
    again = screen(llama_pair_dirs, prompts, run, "--backend", "ray", "--workers", "2")
    assert "ray backend): 5 components to score" in (run / "log.txt").read_text()
    assert again.index.is_unique and set(again.index) == set(first.index)
    torch.testing.assert_close(
        torch.tensor(again.loc[first.index, "score"].values), torch.tensor(first["score"].values), atol=1e-5, rtol=1e-4
    )
