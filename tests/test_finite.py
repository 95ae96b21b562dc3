"""NaN/inf weights are refused with the parameters named; no non-finite anchor or score is produced."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_pair, tiny_texts
from weightpatch.anchors import Anchor, build_anchor, search_anchor_layer
from weightpatch.errors import WeightPatchError
from weightpatch.pair import check_finite, load_pair, nonfinite_parameters
from weightpatch.scoring import AnchorScorer

BAD = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_pair("llama", tmp_path_factory.mktemp("pair"))


def _poisoned(source, target, value, count=3):
    shutil.copytree(source, target)
    f = target / "model.safetensors"
    state = load_file(str(f))
    state[BAD].view(-1)[:count] = value
    save_file(state, str(f), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("role", ["base", "specialized"])
def test_check_finite_names_the_first_nonfinite_parameters(dirs, tmp_path, role):
    base, specialized = dirs
    if role == "base":
        base = _poisoned(base, tmp_path / "base", float("nan"))
    else:
        specialized = _poisoned(specialized, tmp_path / "specialized", float("inf"), count=2)
    pair = load_pair(base, specialized)
    found = nonfinite_parameters(pair)
    expected = (BAD, 3, 0) if role == "base" else (BAD, 0, 2)
    assert found[role] == [expected] and found["base" if role == "specialized" else "specialized"] == []
    with pytest.raises(WeightPatchError, match=rf"the {role} model .* non-finite weights: {BAD} \(") as err:
        check_finite(pair)
    assert "\n" not in str(err.value)
    check_finite(load_pair(*dirs))  # a clean pair passes


def test_no_anchor_from_nonfinite_residuals(dirs, tmp_path):
    # Was: an all-NaN anchor saved, "Cohen's d inf".
    pair = load_pair(dirs[0], _poisoned(dirs[1], tmp_path / "specialized", float("nan")))
    with pytest.raises(WeightPatchError, match=r"residual stream is NaN/inf at layers \[2\] on 6 of 6 prompts"):
        build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    with pytest.raises(WeightPatchError, match=r"residual stream is NaN/inf at layers \[1, 2\]"):
        search_anchor_layer(pair, tiny_texts(6), None, tiny_texts(6, 3), None, method="model_diff", layers=[0, 1, 2])
    build_anchor(pair, tiny_texts(6), None, layer=0, method="model_diff")  # below the NaN: fine
    with pytest.raises(WeightPatchError, match="anchor vector holds NaN/inf"):
        Anchor(torch.full((32,), float("nan")), 1, "model_diff", {}, "")


def test_nonfinite_patched_scores_are_refused(dirs):
    pair = load_pair(*dirs)
    scorer = AnchorScorer(pair, build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff"), tiny_texts(6, 1))
    assert scorer.effect(scorer.f_donor).mean == pytest.approx(1.0)
    f = scorer.f_donor.clone()
    f[scorer.valid.nonzero()[0]] = float("nan")
    with pytest.raises(WeightPatchError, match="patched model's anchor scores contain NaN/inf"):
        scorer.effect(f)
