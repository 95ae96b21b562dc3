import pytest
import torch

from conftest import make_pair, perturbed_copy, save, tiny_model, tiny_tokenizer, tree_hash
from weightpatch.errors import PairMismatchError, UnknownArchitectureError, WeightPatchError
from weightpatch.pair import load_pair
from weightpatch.patch import patched
from weightpatch.weights import SafetensorsSource, TensorDictSource


def test_loading_and_patching_never_write_to_the_input_directories(tmp_path):
    base_dir, sft_dir = make_pair("llama", tmp_path)
    hashes = tree_hash(base_dir), tree_hash(sft_dir)
    pair = load_pair(base_dir, sft_dir)
    with patched(pair.model, pair.donor, pair.space, pair.space.everything()):
        pass
    assert (tree_hash(base_dir), tree_hash(sft_dir)) == hashes
    assert isinstance(pair.donor, SafetensorsSource)  # read lazily, not a second model
    ids = pair.identities()
    assert ids["base"]["weights_sha256"] != ids["specialized"]["weights_sha256"]
    assert ids["architecture"] == "llama" and "torch" in ids["versions"]


def test_different_shapes_are_listed(tmp_path):
    base = tiny_model("llama")
    other = tiny_model("llama", intermediate_size=40)
    save(base, tmp_path / "a")
    save(other, tmp_path / "b")
    with pytest.raises(
        PairMismatchError, match=r"model.layers.0.mlp.down_proj.weight: base \(32, 48\) vs specialized \(32, 40\)"
    ):
        load_pair(tmp_path / "a", tmp_path / "b")


def test_different_vocabularies_are_listed(tmp_path):
    base = tiny_model("llama")
    save(base, tmp_path / "a")
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    save(perturbed_copy(base), tmp_path / "b", tokenizer=tok)
    with pytest.raises(PairMismatchError, match=r"token '<extra>' only in specialized"):
        load_pair(tmp_path / "a", tmp_path / "b")


def test_different_architectures_are_refused(tmp_path):
    save(tiny_model("llama"), tmp_path / "a")
    save(tiny_model("qwen2"), tmp_path / "b")
    with pytest.raises(PairMismatchError, match=r"model_type: base 'llama' vs specialized 'qwen2'"):
        load_pair(tmp_path / "a", tmp_path / "b")


def test_unknown_architecture_and_missing_directory(tmp_path):
    import transformers

    bert = transformers.BertLMHeadModel(
        transformers.BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            is_decoder=True,
        )
    )
    save(bert, tmp_path / "bert")
    with pytest.raises(UnknownArchitectureError, match="Add one"):
        load_pair(tmp_path / "bert", tmp_path / "bert")
    with pytest.raises(WeightPatchError, match="does not exist"):
        load_pair(tmp_path / "nope", tmp_path / "bert")


def test_bin_checkpoint_donor_and_bf16_receiver(tmp_path):
    base = tiny_model("llama")
    sft = perturbed_copy(base)
    save(base, tmp_path / "a")
    (tmp_path / "b").mkdir()
    sft.config.save_pretrained(tmp_path / "b")
    torch.save(sft.state_dict(), tmp_path / "b" / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(tmp_path / "b")
    pair = load_pair(tmp_path / "a", tmp_path / "b", dtype="bfloat16")
    assert isinstance(pair.donor, TensorDictSource)
    assert pair.model.dtype == torch.bfloat16
    name = "model.layers.0.mlp.up_proj.weight"
    with patched(pair.model, pair.donor, pair.space, ["L0.mlp"]):
        assert torch.equal(pair.model.get_parameter(name), sft.get_parameter(name).to(torch.bfloat16))


def test_as_model_gives_each_role_its_checkpoint_and_refuses_other_roles(llama_pair_dirs):
    from transformers import AutoModelForCausalLM

    pair = load_pair(*llama_pair_dirs)
    ids = torch.tensor([[5, 9, 11, 7]])
    for role, directory in zip(("base", "specialized"), llama_pair_dirs, strict=True):
        reference = AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad(), pair.as_model(role) as model:
            assert torch.equal(model(ids).logits, reference(ids).logits), role
    refused = pytest.raises(WeightPatchError, match=r"^unknown model role 'sft'; use 'base' or 'specialized'$")
    with refused, pair.as_model("sft"):
        pass
