import pytest
import torch

from conftest import perturbed_copy, save, tiny_model
from weightpatch.components import ParamSlice
from weightpatch.errors import PairMismatchError
from weightpatch.pair import load_pair
from weightpatch.patch import patched
from weightpatch.weights import SafetensorsSource


def test_sharded_checkpoint_reads_whole_tensors_and_multi_range_slices(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    source = SafetensorsSource(tmp_path)
    state = model.state_dict()
    for name, tensor in state.items():
        assert source.shape(name) == tuple(tensor.shape)
        assert torch.equal(source.read(ParamSlice(name)), tensor)
    name = "model.layers.1.self_attn.o_proj.weight"
    piece = ParamSlice(name, 1, ((0, 3), (8, 16), (30, 32)))
    expected = torch.cat([state[name][:, 0:3], state[name][:, 8:16], state[name][:, 30:32]], dim=1)
    assert torch.equal(source.read(piece), expected)
    with pytest.raises(PairMismatchError, match="missing"):
        source.read(ParamSlice("model.layers.9.mlp.up_proj.weight"))


def test_tied_unembedding_is_read_through_its_alias(tmp_path):
    base = tiny_model("gemma")  # tied: the checkpoint stores only the embedding
    sft = perturbed_copy(base)
    pair = load_pair(save(base, tmp_path / "a"), save(sft, tmp_path / "b"))
    with patched(pair.model, pair.donor, pair.space, ["unembed"]):
        assert torch.equal(pair.model.lm_head.weight, sft.lm_head.weight)
        assert pair.model.lm_head.weight.data_ptr() == pair.model.model.embed_tokens.weight.data_ptr()
