"""The behaviour objective: teacher-forced log-probability of the specialized model's own greedy
responses, normalized like the anchor score."""

import pytest
import torch

from conftest import make_pair, tiny_texts
from weightpatch.backends import LocalBackend
from weightpatch.behaviour import (
    BehaviourScorer,
    PlainBackend,
    responses_sha256,
    specialized_responses,
    teacher_forced_batch,
)
from weightpatch.engine import run_blocks
from weightpatch.errors import WeightPatchError
from weightpatch.generation import generate_ids
from weightpatch.pair import load_pair
from weightpatch.patch import patched
from weightpatch.screening.first_order import gradient_scores


@pytest.fixture(scope="module")
def scorer64(tmp_path_factory):
    pair = load_pair(*make_pair("llama", tmp_path_factory.mktemp("b"), scale=0.05), dtype="float64")
    return BehaviourScorer(pair, tiny_texts(6, 3), batch_size=4, min_relative_gap=0.0, max_new_tokens=5)


def test_responses_are_the_specialized_models_own_greedy_outputs(scorer64):
    pair = scorer64.pair
    with pair.as_model("specialized") as sft:
        expected = generate_ids(sft, pair.tokenizer, scorer64.texts, max_new_tokens=5, batch_size=1)
    assert scorer64.responses == expected
    assert all(1 <= len(r) <= 5 for r in scorer64.responses)
    # the base answers differently somewhere, or the objective would have no gap to measure
    base = generate_ids(pair.model, pair.tokenizer, scorer64.texts, max_new_tokens=5)
    assert base != expected
    assert scorer64.responses_sha256 == responses_sha256(scorer64.texts, expected)
    assert responses_sha256(scorer64.texts, base) != scorer64.responses_sha256


def test_readout_is_the_mean_log_probability_of_the_response_tokens(scorer64):
    pair = scorer64.pair
    text, response = scorer64.texts[0], scorer64.responses[0]
    prompt = pair.tokenizer(text, add_special_tokens=True)["input_ids"]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = torch.log_softmax(pair.model(input_ids=ids).logits[0].double(), -1)
    by_hand = sum(float(logprobs[len(prompt) - 1 + t, tok]) for t, tok in enumerate(response)) / len(response)
    # the padded batch (left padding, position ids over real tokens) gives the unpadded value
    assert float(scorer64.f_receiver[0]) == pytest.approx(by_hand, abs=1e-10)


def test_patch_nothing_is_zero_and_patch_everything_is_one_exactly(scorer64):
    pair = scorer64.pair
    with torch.no_grad():
        assert scorer64.effect(scorer64.values(pair.model)).mean == 0.0
        with patched(pair.model, pair.donor, pair.space, pair.space.everything()):
            assert scorer64.effect(scorer64.values(pair.model)).mean == 1.0


@pytest.mark.parametrize("component", ["L0.mlp", "L1.attn.head2", "L0.mlp.neuron7", "L2", "L1.attn.q"])
def test_first_order_matches_finite_difference(scorer64, component):
    pair = scorer64.pair
    score = gradient_scores(scorer64, components=[component], progress=False).frame["score"].item()
    eps = 1e-3
    moved = []
    for alpha in (eps, -eps):
        with torch.no_grad(), patched(pair.model, pair.donor, pair.space, [component], alpha=alpha):
            moved.append(scorer64.effect(scorer64.values(pair.model)).mean)
    fd = (moved[0] - moved[1]) / (2 * eps)
    assert abs(fd) > 1e-5
    assert score == pytest.approx(fd, rel=2e-3)


def test_exact_scores_are_one_full_forward_per_component(scorer64):
    pair = scorer64.pair
    seen = []
    with PlainBackend(scorer64) as backend:
        table = backend.run(["L1.mlp", "L0.attn.head1", "L0.mlp"], skip={"L0.mlp"}, on_result=seen.append)
    assert list(table.frame["component"]) == ["L1.mlp", "L0.attn.head1"]
    assert [len(t) for t in seen] == [1, 1]
    assert list(table.frame["method"]) == ["exact", "exact"]
    with torch.no_grad(), patched(pair.model, pair.donor, pair.space, ["L1.mlp"]):
        by_hand = float(((scorer64.values(pair.model) - scorer64.f_receiver) / scorer64.gap).mean())
    assert table.frame.set_index("component").loc["L1.mlp", "score"] == pytest.approx(by_hand, abs=1e-12)


def test_identical_models_are_refused_by_name(tmp_path):
    base, _ = make_pair("llama", tmp_path, scale=0.05)
    pair = load_pair(base, base)
    with pytest.raises(WeightPatchError, match="the specialized model's responses does not separate"):
        BehaviourScorer(pair, tiny_texts(3), max_new_tokens=3)


def test_empty_response_and_count_mismatch_are_refused(scorer64):
    with pytest.raises(WeightPatchError, match="empty response"):
        teacher_forced_batch(scorer64.pair.tokenizer, ["a"], [[]])
    with pytest.raises(WeightPatchError, match="2 responses for 6 prompts"):
        BehaviourScorer(scorer64.pair, scorer64.texts, responses=scorer64.responses[:2])


def test_specialized_responses_restore_the_receiver(scorer64):
    pair = scorer64.pair
    before = {k: v.clone() for k, v in pair.model.state_dict().items()}
    specialized_responses(pair, scorer64.texts[:2], max_new_tokens=2)
    after = pair.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", ["qwen2", "gemma", "gpt2", "gpt_neox"])
def test_first_order_matches_finite_difference_across_families(family, tmp_path):
    """The behaviour readout runs each family's own forward (tied and scaled embeddings, learned
    positions, left padding): first order equals a central difference for a block of each."""
    pair = load_pair(*make_pair(family, tmp_path, scale=0.05), dtype="float64")
    scorer = BehaviourScorer(pair, tiny_texts(4, 3), batch_size=4, min_relative_gap=0.0, max_new_tokens=4)
    score = gradient_scores(scorer, components=["L1"], progress=False).frame["score"].item()
    moved = []
    for alpha in (1e-3, -1e-3):
        with torch.no_grad(), patched(pair.model, pair.donor, pair.space, ["L1"], alpha=alpha):
            moved.append(scorer.effect(scorer.values(pair.model)).mean)
    fd = (moved[0] - moved[1]) / 2e-3
    assert abs(fd) > 1e-5
    assert score == pytest.approx(fd, rel=2e-3)


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])
def test_engine_exact_scores_equal_the_plain_way(family, tmp_path):
    """The sweep engine under the behaviour objective (cached block inputs, stacked variants, the
    head as readout, the neuron sweep, the plain way for what the head reads) gives the plain
    whole-model scores: every module, head, layer and a neuron per layer, the embedding (tied to the
    unembedding in gemma and gpt2), the final norm and the unembedding."""
    pair = load_pair(*make_pair(family, tmp_path, scale=0.05), dtype="float64")
    scorer = BehaviourScorer(pair, tiny_texts(6, 3), batch_size=4, min_relative_gap=0.0, max_new_tokens=5)
    names = [str(c) for c in pair.space.components(kinds=("module", "head", "layer"))]
    names += ["L0.mlp.neuron3", "L1.mlp.neuron5"]
    assert {"norm.final", "unembed"} <= set(names)
    plain = PlainBackend(scorer).run(names, progress=False).frame.set_index("component")["score"]
    with LocalBackend.from_scorer(scorer) as backend:
        engine = backend.run(names, progress=False).frame.set_index("component")["score"]
    assert sorted(engine.index) == sorted(plain.index)
    assert engine.reindex(plain.index).to_numpy() == pytest.approx(plain.to_numpy(), abs=1e-12)
    assert plain.abs().loc[["norm.final", "unembed", "L1.mlp"]].min() > 1e-4  # the head's pieces count


def test_the_head_readout_of_the_last_block_is_the_whole_forward(scorer64):
    """``readout`` of the receiver's last-block output (run from the cached block inputs) equals
    the whole-model readout the references were measured with, so a no-op patch scores 0."""
    last = scorer64.stop
    assert last == scorer64.pair.space.num_layers - 1 and not scorer64.last_position
    for bi, batch in enumerate(scorer64.batches):
        hidden = run_blocks(scorer64, bi, last)
        n = len(batch)
        expected = scorer64.f_receiver[bi * 4 : bi * 4 + n]
        assert torch.equal(scorer64.readout(hidden, bi), expected)
        stacked = scorer64.readout(hidden.repeat(2, 1, 1), bi)  # two stacked variants, variant-major
        assert torch.allclose(stacked, expected.repeat(2), atol=1e-12)


def test_activation_patching_and_curves_run_under_the_behaviour_objective(scorer64):
    """Activation patching and the sufficiency curve read any objective: activation-patching a
    block equals overwriting its output with the donor's and reading the head the plain way, and
    the top-k curve's recovery equals the effect of patching the top-k weights together."""
    from weightpatch.activation import activation_scores
    from weightpatch.validation import sufficiency_curve, with_patch

    pair = scorer64.pair
    score = activation_scores(scorer64, ["L0"]).frame["score"].item()
    with torch.no_grad(), pair.as_model("specialized") as sft:
        donor_out = [run_blocks(scorer64, bi, 0, 0, model=sft) for bi in range(len(scorer64.batches))]

    def overwrite(_m, _a, out):
        return (donor_out.pop(0), *out[1:]) if isinstance(out, tuple) else donor_out.pop(0)

    handle = pair.model.get_submodule(pair.space.layer_path(0)).register_forward_hook(overwrite)
    try:
        by_hand = scorer64.effect(scorer64.values(pair.model)).mean
    finally:
        handle.remove()
    assert score == pytest.approx(by_hand, abs=1e-10)

    table = gradient_scores(scorer64, kinds=("module",), progress=False)
    curve = sufficiency_curve(scorer64, table, ks=[2], kind="module", controls=0)
    top = curve["components"].iloc[0]
    with torch.no_grad(), with_patch(pair, top) as model:
        expected = scorer64.effect(scorer64.values(model)).mean
    assert curve["recovery"].iloc[0] == pytest.approx(expected, abs=1e-10)
