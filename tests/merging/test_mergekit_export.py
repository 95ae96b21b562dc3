"""mergekit YAML export, and (when mergekit is installed) agreement with mergekit's own merge."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from merging_testutil import build_tiny_checkpoints, tiny_config

from weightpatch.components import ComponentSpace
from weightpatch.errors import WeightPatchError
from weightpatch.merging.mechanism import owner_takes_top, score_weighted
from weightpatch.merging.mergekit_export import mergekit_config, validate_with_mergekit, write_mergekit_yaml
from weightpatch.merging.methods import MergeConfig
from weightpatch.merging.stream import Checkpoint, merge_checkpoints


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    return build_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="module")
def space():
    from transformers import AutoModelForCausalLM

    return ComponentSpace.from_model(AutoModelForCausalLM.from_config(tiny_config()))


def test_baseline_exports():
    r = mergekit_config(MergeConfig(weights=(1.0, 0.5), lam=0.4), "base", ["a", "b"])
    assert r.exact
    assert r.config["merge_method"] == "task_arithmetic"
    assert [m["parameters"]["weight"] for m in r.config["models"]] == [0.4, 0.2]  # lam folded
    assert r.config["parameters"]["normalize"] is False
    r = mergekit_config(MergeConfig("ties", density=(0.5, 0.3), lam=0.8), "base", ["a", "b"])
    assert r.config["parameters"] == {"normalize": True, "int8_mask": False, "lambda": 0.8}
    assert [m["parameters"] for m in r.config["models"]] == [
        {"weight": 1.0, "density": 0.5},
        {"weight": 1.0, "density": 0.3},
    ]
    r = mergekit_config(MergeConfig("dare_ties", drop_rate=0.9), "base", ["a"])
    assert r.config["models"][0]["parameters"]["density"] == pytest.approx(0.1)
    assert r.config["parameters"]["rescale"] is True
    assert not r.exact  # random masks / rescale differ


def test_mechanism_export_module_level_is_exact(space, tmp_path):
    m = owner_takes_top(space, [{"L1.mlp": 1.0}, {"L0.attn": 1.0}], top_k=1, standard=MergeConfig(lam=0.5))
    r = write_mergekit_yaml(tmp_path / "m.yml", m, "base", ["a", "b"])
    assert r.exact, r.approximations
    cfg = yaml.safe_load((tmp_path / "m.yml").read_text())
    wa = cfg["models"][0]["parameters"]["weight"]
    assert {"filter": "model.layers.1.mlp.up_proj.weight", "value": 1.0} in wa
    assert {"filter": "model.layers.0.self_attn.q_proj.weight", "value": 0.0} in wa
    assert wa[-1] == {"value": 0.5}


def test_mechanism_export_slice_level_is_approximated(space):
    m = score_weighted(space, [{"L0.attn.head1": 1.0}], floor=0.0)
    r = mergekit_config(m, "base", ["a"])
    assert not r.exact
    assert any("model.layers.0.self_attn.q_proj.weight" in a for a in r.approximations)
    w = r.config["models"][0]["parameters"]["weight"]
    q = next(e for e in w if e.get("filter") == "model.layers.0.self_attn.q_proj.weight")
    assert q["value"] == pytest.approx(0.25)  # one head of four
    assert w[-1] == {"value": 0.0}


def _run_mergekit(cfg: dict, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(
        MergeConfiguration.model_validate(cfg),
        str(out),
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )


@pytest.mark.parametrize(
    "cfg",
    [
        MergeConfig("task_arithmetic", weights=(1.0, 0.5), lam=0.7),
        MergeConfig("ties", weights=(1.0, 0.6), density=0.5),
        MergeConfig("ties", density=(0.3, 0.7), lam=0.8),
    ],
    ids=["task_arithmetic", "ties", "ties_lambda"],
)
def test_agrees_with_mergekit(tiny_checkpoints, tmp_path, cfg):
    pytest.importorskip("mergekit.merge")
    base, a, b = tiny_checkpoints
    ours = merge_checkpoints(base, [a, b], tmp_path / "ours", cfg)
    report = mergekit_config(cfg, base, [a, b])
    assert report.exact
    _run_mergekit(report.config, tmp_path / "theirs")
    o = Checkpoint(ours)
    t = Checkpoint(tmp_path / "theirs")
    assert set(t.names) <= set(o.names)
    for name in t.names:
        torch.testing.assert_close(o.get(name), t.get(name), rtol=1e-5, atol=1e-6, msg=name)


def test_mechanism_export_agrees_with_mergekit(tiny_checkpoints, tmp_path):
    pytest.importorskip("mergekit.merge")
    from weightpatch.merging.mechanism import component_space_for_checkpoint

    base, a, b = tiny_checkpoints
    space = component_space_for_checkpoint(base)
    m = owner_takes_top(space, [{"L1.mlp": 1.0}, {"L0.attn": 1.0}], top_k=1, standard=MergeConfig(lam=0.5))
    ours = merge_checkpoints(base, [a, b], tmp_path / "ours", m)
    report = mergekit_config(m, base, [a, b])
    assert report.exact
    _run_mergekit(report.config, tmp_path / "theirs")
    o = Checkpoint(ours)
    t = Checkpoint(tmp_path / "theirs")
    for name in t.names:
        torch.testing.assert_close(o.get(name), t.get(name), rtol=1e-5, atol=1e-6, msg=name)


def test_repeated_expert_is_exported_once_with_summed_weights(tiny_checkpoints):
    base, a, _ = tiny_checkpoints
    r = mergekit_config(MergeConfig(weights=(1.0, 0.5), lam=0.7), base, [a, a])
    assert [m["model"] for m in r.config["models"]] == [str(a)]
    assert r.config["models"][0]["parameters"]["weight"] == pytest.approx(1.05)
    assert r.exact
    r = mergekit_config(MergeConfig("ties", weights=(1.0, 0.5), density=0.4), base, [a, a.parent / "x" / ".." / a.name])
    assert r.config["models"] == [{"model": str(a), "parameters": {"weight": 1.5, "density": 0.4}}]


def test_repeated_expert_that_cannot_be_combined_is_refused(tiny_checkpoints):
    base, a, _ = tiny_checkpoints
    with pytest.raises(WeightPatchError, match="given 2 times with different densities"):
        mergekit_config(MergeConfig("ties", density=(0.3, 0.7)), base, [a, a])
    with pytest.raises(WeightPatchError, match="given 2 times with weights of opposite signs"):
        mergekit_config(MergeConfig("ties", weights=(1.0, -0.5)), base, [a, a])


def test_export_is_validated_by_mergekit():
    pytest.importorskip("mergekit.config")
    assert mergekit_config(MergeConfig("ties", density=0.5), "base", ["a", "b"]).validated
    with pytest.raises(WeightPatchError, match="mergekit rejects the exported config"):
        validate_with_mergekit({"merge_method": "ties", "models": "not a list"})


def test_repeated_expert_export_agrees_with_mergekit(tiny_checkpoints, tmp_path):
    pytest.importorskip("mergekit.merge")
    base, a, b = tiny_checkpoints
    cfg = MergeConfig("ties", weights=(1.0, 0.5, 0.8), density=0.5)
    ours = merge_checkpoints(base, [a, b, a], tmp_path / "ours", cfg)
    report = mergekit_config(cfg, base, [a, b, a])
    assert report.exact and report.validated
    _run_mergekit(report.config, tmp_path / "theirs")
    o, t = Checkpoint(ours), Checkpoint(tmp_path / "theirs")
    for name in t.names:
        torch.testing.assert_close(o.get(name), t.get(name), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow  # a mergekit-yaml subprocess: 15-45 s, mostly importing mergekit
def test_mergekit_yaml_command_reproduces_the_export(tiny_checkpoints, tmp_path):
    pytest.importorskip("mergekit.merge")
    exe = Path(sys.executable).with_name("mergekit-yaml")
    if not exe.exists():
        pytest.skip("mergekit-yaml is not installed next to this Python")
    base, a, b = tiny_checkpoints
    cfg = MergeConfig("ties", weights=(1.0, 0.6), density=0.5, lam=0.8)
    ours = merge_checkpoints(base, [a, b], tmp_path / "ours", cfg)
    report = write_mergekit_yaml(tmp_path / "merge.yml", cfg, base, [a, b])
    assert report.exact
    assert (
        (tmp_path / "merge.yml")
        .read_text()
        .startswith("# mergekit config written by weightpatch (validated by mergekit's config model)\n")
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(exe), str(tmp_path / "merge.yml"), str(tmp_path / "theirs"), "--no-copy-tokenizer", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    o, t = Checkpoint(ours), Checkpoint(tmp_path / "theirs")
    assert set(t.names) == set(o.names)
    for name in t.names:
        torch.testing.assert_close(o.get(name), t.get(name), rtol=1e-5, atol=1e-6, msg=name)


def test_owner_blend_export_agrees_with_mergekit(tiny_checkpoints, tmp_path):
    pytest.importorskip("mergekit.merge")
    from weightpatch.merging.mechanism import component_space_for_checkpoint

    base, a, b = tiny_checkpoints
    space = component_space_for_checkpoint(base)
    scores = [{"L1.mlp": 1.0}, {"L1.mlp": 0.5, "L0.attn": 1.0}]  # L1.mlp shared: shares 2/3 and 1/3
    m = owner_takes_top(space, scores, top_k=2, conflict="blend", others=0.2, rest=0.7, standard=MergeConfig(lam=0.5))
    ours = merge_checkpoints(base, [a, b], tmp_path / "ours", m)
    report = mergekit_config(m, base, [a, b])
    assert report.exact, report.approximations
    _run_mergekit(report.config, tmp_path / "theirs")
    o, t = Checkpoint(ours), Checkpoint(tmp_path / "theirs")
    for name in t.names:
        torch.testing.assert_close(o.get(name), t.get(name), rtol=1e-5, atol=1e-6, msg=name)


def test_localize_stitch_is_not_exported():
    with pytest.raises(WeightPatchError, match="no mergekit equivalent"):
        mergekit_config(MergeConfig("localize_stitch"), "base", ["a", "b"])
