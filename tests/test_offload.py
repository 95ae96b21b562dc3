"""Models offloaded by accelerate: CPU offload is patched in the hooks' weights map, disk offload is
refused clearly."""

import pytest
import torch
from accelerate import cpu_offload, disk_offload

from conftest import tiny_texts
from weightpatch.anchors import build_anchor
from weightpatch.errors import WeightPatchError
from weightpatch.pair import load_pair
from weightpatch.patch import patched
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen
from weightpatch.screening.first_order import gradient_scores


def test_cpu_offloaded_receiver_scores_like_the_plain_one(llama_pair_dirs):
    components = ["L0.mlp", "L1.attn.head2", "L1.mlp.neuron3", "L2", "embed"]
    scores = {}
    for offload in (False, True):
        pair = load_pair(*llama_pair_dirs)
        anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
        if offload:
            cpu_offload(pair.model, execution_device=torch.device("cpu"))
            assert pair.model.get_parameter("model.layers.0.mlp.up_proj.weight").device.type == "meta"
            with pytest.raises(WeightPatchError, match="offloaded by accelerate"):
                gradient_scores(AnchorScorer(pair, anchor, tiny_texts(6, 4)), components=components)
        scorer = AnchorScorer(pair, anchor, tiny_texts(6, 4))
        scores[offload] = ExactScreen(scorer).run(components, progress=False).frame["score"]
        if offload:  # patching everything still gives the specialized model, and restores
            storage = pair.model.model.layers[0].mlp.up_proj._hf_hook.weights_map["weight"]
            before = storage.clone()
            with patched(pair.model, pair.donor, pair.space, pair.space.everything()):
                assert not torch.equal(storage, before)
                assert scorer.effect(scorer.anchor_scores(pair.model)).mean == pytest.approx(1.0, abs=1e-5)
            assert torch.equal(storage, before)
    torch.testing.assert_close(torch.tensor(scores[True].values), torch.tensor(scores[False].values))


def test_disk_offloaded_weights_are_refused(llama_pair_dirs, tmp_path):
    pair = load_pair(*llama_pair_dirs)
    disk_offload(pair.model, tmp_path / "offload", execution_device=torch.device("cpu"))
    with (
        pytest.raises(WeightPatchError, match="offloaded to disk"),
        patched(pair.model, pair.donor, pair.space, ["L0.mlp"]),
    ):
        pass


def test_an_offload_hook_chained_with_another_hook_is_patched(llama_pair_dirs):
    """accelerate chains hooks in a SequentialHook (``.hooks``); the one holding the weights map is found
    among hooks that hold none."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    pair = load_pair(*llama_pair_dirs)
    cpu_offload(pair.model, execution_device=torch.device("cpu"))
    up = pair.model.model.layers[0].mlp.up_proj
    add_hook_to_module(up, ModelHook(), append=True)
    assert len(up._hf_hook.hooks) == 2
    storage = up._hf_hook.hooks[0].weights_map["weight"]
    before = storage.clone()
    with patched(pair.model, pair.donor, pair.space, ["L0.mlp"]):
        (up_slice,) = [s for s in pair.space.resolve("L0.mlp") if s.name == "model.layers.0.mlp.up_proj.weight"]
        assert torch.equal(storage, pair.donor.read(up_slice))
    assert torch.equal(storage, before)


def test_a_parameter_on_the_meta_device_without_real_storage_is_refused(llama_pair_dirs):
    """Not loaded at all (no hook), or a hook whose weights map holds only a meta tensor: the same error."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    for hooked in (False, True):
        pair = load_pair(*llama_pair_dirs)
        up = pair.model.model.layers[0].mlp.up_proj
        up.weight = torch.nn.Parameter(torch.empty_like(up.weight, device="meta"))
        if hooked:
            hook = ModelHook()
            hook.weights_map = {"weight": torch.empty_like(up.weight, device="meta")}
            add_hook_to_module(up, hook)
        with (
            pytest.raises(WeightPatchError, match="offloaded to disk \\(or not loaded\\)"),
            patched(pair.model, pair.donor, pair.space, ["L0.mlp"]),
        ):
            pass


def test_a_device_map_placed_receiver_scores_like_the_plain_one(llama_pair_dirs):
    """`--device-map auto` (accelerate's placement through from_pretrained): same exact scores, and
    the stage configs carry it to load_pair (a pair opened otherwise is refused by the stage)."""
    from weightpatch.config import ScreenConfig
    from weightpatch.pipeline.inputs import check_pair_matches, open_pair

    components = ["L0.mlp", "L1.attn.head2", "L2"]
    scores = []
    for device_map in (None, "auto", {"": "cpu"}):
        pair = load_pair(*llama_pair_dirs, device_map=device_map)
        assert pair.options["device_map"] == device_map
        anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
        scorer = AnchorScorer(pair, anchor, tiny_texts(6, 4))
        scores.append(ExactScreen(scorer).run(components, progress=False).frame["score"].tolist())
    assert scores[0] == scores[1] == scores[2]
    base, sft = map(str, llama_pair_dirs)
    cfg = ScreenConfig(base=base, specialized=sft, prompts="p.txt", device_map="auto", max_memory="cpu=2GiB")
    pair = open_pair(cfg)
    assert pair.options["device_map"] == "auto" and pair.options["max_memory"] == {"cpu": "2GiB"}
    with pytest.raises(WeightPatchError, match=r"device_map 'auto' \(pair\) vs None \(config\)"):
        check_pair_matches(cfg.model_copy(update={"device_map": None}), pair)


def test_device_auto_picks_what_is_there(monkeypatch):
    from weightpatch.pair import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(WeightPatchError, match=r"device .cuda. is not available \(.*\); use --device auto or cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
