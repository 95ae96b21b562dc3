"""PEFT LoRA adapters as the specialized model: deltas from the factors, slice by slice, equal to
PEFT's own ``merge_and_unload`` copy (scores, logits, first-order scores, the merge expert)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import save, tiny_model
from weightpatch import demo
from weightpatch.anchors import Anchor, build_anchor
from weightpatch.components import ParamSlice
from weightpatch.errors import PairMismatchError, WeightPatchError
from weightpatch.lora import LoraAdapter, adapter_summary, is_adapter_dir
from weightpatch.pair import load_pair
from weightpatch.patch import patched
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen
from weightpatch.screening.first_order import gradient_scores

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

PROMPTS = [
    "Give me a short note about the river. Your entire response should be in English, and in all capital letters.",
    "Write about the garden. Do not use any commas in your response.",
    "Describe the city. Wrap your entire response with double quotation marks.",
    "Tell me about the sea. Your answer must contain a title, wrapped in double angular brackets.",
]
COMPONENTS = ["L0.attn.head1", "L1.attn.q", "L2.mlp", "L1.mlp.neuron5", "L3", "embed", "unembed", "L0.attn.o"]


def _build_adapter(base_dir, out_dir, seed: int = 0, **lora_kwargs):
    """A PEFT adapter with random (non-zero) A and B on ``base_dir``; returns (adapter dir, merged dir)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = peft.LoraConfig(init_lora_weights=False, **lora_kwargs)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():  # shrink B so the adapted model stays a small fine-tune
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(0.1)
            elif "modules_to_save" in name:
                p.add_(0.01 * torch.randn_like(p))
    wrapped.save_pretrained(out_dir / "adapter")
    merged = wrapped.merge_and_unload()
    merged.save_pretrained(out_dir / "merged")
    for f in base_dir.iterdir():  # the merged copy gets the base's tokenizer files
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            (out_dir / "merged" / f.name).write_bytes(f.read_bytes())
    return out_dir / "adapter", out_dir / "merged"


DEMO_LORA = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "o_proj", "v_proj", "up_proj", "down_proj", "embed_tokens"],
    use_rslora=True,
    rank_pattern={"layers.1.self_attn.q_proj": 2},
    alpha_pattern={"down_proj": 3},
    modules_to_save=["lm_head"],
)


@pytest.fixture(scope="module")
def demo_adapter(tmp_path_factory):
    return _build_adapter(demo.paths().base, tmp_path_factory.mktemp("lora"), **DEMO_LORA)


@pytest.fixture(scope="module")
def pairs(demo_adapter):
    adapter, merged = demo_adapter
    base = demo.paths().base
    return load_pair(base, adapter, dtype="float64"), load_pair(base, merged, dtype="float64")


def _scorer(pair, anchor):
    same = Anchor(anchor.vector, anchor.layer, anchor.method, pair.identities(), anchor.prompts_sha256)
    return AnchorScorer(pair, same, PROMPTS, batch_size=4, min_relative_gap=0.0)


def test_adapter_directory_is_detected_and_parsed(demo_adapter):
    adapter_dir, merged = demo_adapter
    assert is_adapter_dir(adapter_dir) and not is_adapter_dir(merged)
    adapter = LoraAdapter.load(adapter_dir)
    q0, q1 = (
        adapter.modules["model.layers.0.self_attn.q_proj.weight"],
        adapter.modules["model.layers.1.self_attn.q_proj.weight"],
    )
    assert (q0.rank, q0.scale) == (4, pytest.approx(8 / 4**0.5))  # rsLoRA: alpha / sqrt(r)
    assert (q1.rank, q1.scale) == (2, pytest.approx(8 / 2**0.5))  # rank_pattern
    assert adapter.modules["model.layers.2.mlp.down_proj.weight"].scale == pytest.approx(3 / 2)  # alpha_pattern
    assert adapter.modules["model.embed_tokens.weight"].transposed
    assert "lm_head.weight" in adapter.replaced  # modules_to_save


def test_donor_equals_merged_checkpoint_on_every_parameter(pairs):
    lora_pair, merged_pair = pairs
    for name in lora_pair.space.shapes:
        ours = lora_pair.donor.read(ParamSlice(name)).double()
        theirs = merged_pair.donor.read(ParamSlice(name)).double()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)


def test_slices_are_computed_from_slices_of_the_factors(pairs):
    """A head's Q rows are scale * B[rows] @ A, its O columns scale * B @ A[:, cols]: the slice of
    the full delta, and the base is read only for the slice's rows/columns."""
    lora_pair, _ = pairs
    donor = lora_pair.donor
    reads: list[ParamSlice] = []
    base_read = donor.base.read
    donor.base.read = lambda piece: reads.append(piece) or base_read(piece)
    try:
        for piece in lora_pair.space.resolve("L0.attn.head1") + lora_pair.space.resolve("L2.mlp.neuron3"):
            expected = donor.read(ParamSlice(piece.name)).index_select(piece.dim, piece.index())
            reads.clear()
            torch.testing.assert_close(donor.read(piece), expected, rtol=1e-6, atol=1e-7)
            assert reads == [piece]  # the base is asked for the slice only
    finally:
        del donor.base.read


def test_patch_everything_gives_the_merged_models_logits(pairs):
    lora_pair, merged_pair = pairs
    batch = lora_pair.tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    with merged_pair.as_model("specialized") as merged_model, torch.no_grad():
        expected = merged_model(**batch).logits
    with patched(lora_pair.model, lora_pair.donor, lora_pair.space, lora_pair.space.everything()), torch.no_grad():
        got = lora_pair.model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    with torch.no_grad():  # restored: the base again
        base_logits = lora_pair.model(**batch).logits
    assert (base_logits - expected).abs().max() > 1e-3


def test_exact_and_first_order_scores_equal_the_merged_copys(pairs):
    lora_pair, merged_pair = pairs
    anchor = build_anchor(lora_pair, PROMPTS, None, layer=2, method="model_diff")
    scorers = [_scorer(lora_pair, anchor), _scorer(merged_pair, anchor)]
    exact = [ExactScreen(s).run(COMPONENTS, progress=False).frame.set_index("component")["score"] for s in scorers]
    assert exact[0].abs().max() > 1e-3
    torch.testing.assert_close(
        torch.tensor(exact[0].values), torch.tensor(exact[1][exact[0].index].values), atol=1e-8, rtol=0
    )
    first = [
        gradient_scores(s, components=COMPONENTS, progress=False).frame.set_index("component")["score"] for s in scorers
    ]
    torch.testing.assert_close(
        torch.tensor(first[0].values), torch.tensor(first[1][first[0].index].values), atol=1e-8, rtol=0
    )


def test_knockout_receiver_is_the_adapted_model(demo_adapter):
    adapter, merged = demo_adapter
    base = demo.paths().base
    knock = load_pair(base, adapter, receiver="specialized", dtype="float64")
    reference = load_pair(base, merged, receiver="specialized", dtype="float64")
    for name, param in knock.model.named_parameters():
        torch.testing.assert_close(param, reference.model.get_parameter(name), rtol=0, atol=1e-6, msg=name)
    with knock.as_model("base") as base_model:  # the donor is the base checkpoint itself
        expected = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).state_dict()
        for name, param in base_model.named_parameters():
            assert torch.equal(param, expected[name]), name


def test_summary_reports_rank_targets_and_delta_norms(demo_adapter, pairs):
    adapter_dir, _ = demo_adapter
    lora_pair, _ = pairs
    summary = adapter_summary(adapter_dir)
    assert summary.rank == 4 and summary.use_rslora
    assert summary.ranks["model.layers.1.self_attn.q_proj.weight"] == 2
    assert summary.target_modules == sorted(DEMO_LORA["target_modules"])
    assert summary.modules_to_save == ["lm_head"]
    name = "model.layers.2.mlp.down_proj.weight"
    base = lora_pair.model.get_parameter(name)
    direct = (lora_pair.donor.read(ParamSlice(name)) - base).norm().item()
    assert summary.delta_norms[name] == pytest.approx(direct, rel=1e-6)
    layer2 = [v for k, v in summary.delta_norms.items() if ".layers.2." in k]
    assert summary.layer_delta_norms[2] == pytest.approx(sum(v**2 for v in layer2) ** 0.5)
    assert json.loads(json.dumps(summary.as_dict()))["layer_delta_norms"]["2"] == pytest.approx(
        summary.layer_delta_norms[2]
    )


def test_fan_in_fan_out_and_lora_bias_on_gpt2(tmp_path):
    base_dir = save(tiny_model("gpt2"), tmp_path / "gpt2-base")
    adapter, merged = _build_adapter(
        base_dir, tmp_path, r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_bias=True
    )
    lora_pair, merged_pair = load_pair(base_dir, adapter, dtype="float64"), load_pair(base_dir, merged, dtype="float64")
    changed = 0
    for name in lora_pair.space.shapes:
        ours, theirs = (
            lora_pair.donor.read(ParamSlice(name)).double(),
            merged_pair.donor.read(ParamSlice(name)).double(),
        )
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(ours, lora_pair.model.get_parameter(name).double())
    assert changed >= 4 * 3  # c_attn / c_proj weights and biases of every layer
    for piece in lora_pair.space.resolve("L1.attn.head2"):  # sliced reads on the transposed layout
        expected = lora_pair.donor.read(ParamSlice(piece.name)).index_select(piece.dim, piece.index())
        torch.testing.assert_close(lora_pair.donor.read(piece), expected, rtol=1e-6, atol=1e-8)


def test_dora_and_other_adapter_types_are_refused(demo_adapter, tmp_path):
    adapter_dir, _ = demo_adapter
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    for change, message in [({"use_dora": True}, "DoRA are not supported"), ({"peft_type": "IA3"}, "PEFT IA3 adapter")]:
        target = tmp_path / next(iter(change))
        target.mkdir()
        (target / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
        (target / "adapter_config.json").write_text(json.dumps(config | change))
        with pytest.raises(WeightPatchError, match=message):
            load_pair(demo.paths().base, target)


def test_adapter_for_another_base_is_a_pair_mismatch(demo_adapter, tmp_path):
    adapter_dir, _ = demo_adapter
    other = save(tiny_model("llama"), tmp_path / "other-base")
    with pytest.raises(PairMismatchError):
        load_pair(other, adapter_dir)


def test_adapter_is_a_merge_expert_equal_to_its_merged_copy(demo_adapter, tmp_path):
    from weightpatch.merging import Checkpoint, MergeConfig, merge_checkpoints

    adapter, merged = demo_adapter
    base = demo.paths().base
    config = MergeConfig("ties", weights=(0.7,), density=0.5, lam=1.0)
    ours = Checkpoint(merge_checkpoints(base, [adapter], tmp_path / "from-adapter", config))
    theirs = Checkpoint(merge_checkpoints(base, [merged], tmp_path / "from-merged", config))
    assert ours.names == theirs.names
    for name in ours.names:
        torch.testing.assert_close(ours.get(name), theirs.get(name), rtol=0, atol=1e-6, msg=name)
    record = json.loads((tmp_path / "from-adapter" / "weightpatch_merge.json").read_text())
    assert [e["path"] for e in record["experts"]] == [str(adapter.absolute())]


def test_adapter_as_the_base_is_refused_clearly(demo_adapter):
    adapter_dir, _ = demo_adapter
    with pytest.raises(WeightPatchError, match="is a PEFT adapter, not a full model"):
        load_pair(adapter_dir, demo.paths().base)


def test_adapter_identity_covers_its_config(demo_adapter, tmp_path):
    """Same factors, another lora_alpha: another model, so another recorded hash."""
    adapter_dir, _ = demo_adapter
    other = tmp_path / "alpha16"
    other.mkdir()
    (other / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": 16}))
    a, b = load_pair(demo.paths().base, adapter_dir), load_pair(demo.paths().base, other)
    assert a.specialized.weights_sha256 != b.specialized.weights_sha256
    assert a.base.weights_sha256 == b.base.weights_sha256
