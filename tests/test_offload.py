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
