from pathlib import Path

import pytest

from weightpatch.config import AnchorConfig, MergeStageConfig, ScreenConfig, build_config
from weightpatch.errors import WeightPatchError


def test_flags_override_file_and_lists_split(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("base: b\nspecialized: s\nprompts: p.jsonl\nkinds: head,neuron\ntop-k: 5\ndevice: cuda\n")
    cfg = build_config(ScreenConfig, f, top_k=7, device=None)
    assert cfg.kinds == ["head", "neuron"] and cfg.top_k == 7 and cfg.device == "cuda"
    assert cfg.prompts == Path("p.jsonl")


def test_identity_drops_run_only_fields_and_model_locations():
    a = AnchorConfig(base="b", specialized="s", prompts="p", device="cpu", batch_size=4, layers="1,3")
    b = AnchorConfig(base="other/b", specialized="s2", prompts="p", device="cuda", batch_size=32, layers=[1, 3])
    assert a.identity() == b.identity() and a.identity()["layers"] == [1, 3]
    assert "device" not in a.identity() and "base" not in a.identity()
    # prompt files are identified by content in the run record, not by where they lie
    assert a.identity() == AnchorConfig(base="b", specialized="s", prompts="/abs/p", layers="1,3").identity()
    assert a.identity() != AnchorConfig(base="b", specialized="s", prompts="p", layers="1,2").identity()


def test_validation_errors_are_one_clear_message(tmp_path):
    with pytest.raises(WeightPatchError, match="prompts: missing"):
        build_config(ScreenConfig, None, base="b", specialized="s")
    with pytest.raises(WeightPatchError, match=r"kinds\.0: Input should be"):
        build_config(ScreenConfig, None, base="b", specialized="s", prompts="p", kinds="heads")
    with pytest.raises(WeightPatchError, match="not found"):
        build_config(ScreenConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(WeightPatchError, match="not valid YAML"):
        build_config(ScreenConfig, bad)


def test_merge_config_lists():
    cfg = MergeStageConfig(base="b", experts="e1,e2", output="o", weights="1,0.5")
    assert cfg.experts == ["e1", "e2"] and cfg.weights == [1.0, 0.5]
