"""The registry, the merge rules added for the paper-setting benchmark (protect-then-add, stitch with any
scores, TALL-mask consensus, layer swapping) against their formulas on hand-built masks, and the score
sources (magnitude, SNIP, random) against their documented selections."""

from __future__ import annotations

import inspect
import random
import re
from pathlib import Path

import pytest
import torch
from merging_testutil import tiny_config

from weightpatch.components import ComponentSpace
from weightpatch.errors import WeightPatchError
from weightpatch.merging import registry
from weightpatch.merging.mechanism import protect_then_add, select_components, stitch
from weightpatch.merging.methods import MergeConfig, consensus, layer_swap, task_arithmetic
from weightpatch.merging.scores import magnitude_scores, random_scores, snip_scores
from weightpatch.runner import encode

HD = 8  # head_dim of the tiny config: hidden 32 / 4 heads
Q = "model.layers.0.self_attn.q_proj.weight"
OPROJ = "model.layers.0.self_attn.o_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
GATE1 = "model.layers.1.mlp.gate_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config())


@pytest.fixture(scope="module")
def space(model):
    return ComponentSpace.from_model(model)


def _tensors(space, name, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = space.shapes[name]
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) for _ in range(n)]


def _mask(space, name, head=None, neuron=None):
    """Hand-written entries of L0 attention head ``head`` (query rows, output columns) or L1 MLP
    neuron ``neuron`` (up/gate row, down column) in parameter ``name``."""
    m = torch.zeros(space.shapes[name], dtype=torch.bool)
    if head is not None and name == Q:
        m[head * HD : (head + 1) * HD] = True
    if head is not None and name == OPROJ:
        m[:, head * HD : (head + 1) * HD] = True
    if neuron is not None and name in (UP1, GATE1):
        m[neuron] = True
    if neuron is not None and name == DOWN1:
        m[:, neuron] = True
    return m


# ---- registry ------------------------------------------------------------------------------------
def test_registered_defaults_are_the_python_functions_defaults(space):
    for entry in [*registry.STANDARD.values(), *registry.RULES.values()]:
        signature = inspect.signature(entry.load())
        for parameter, value in entry.defaults.items():
            if parameter in signature.parameters and parameter not in ("layer_owners", "fraction"):
                assert signature.parameters[parameter].default == value, (entry.name, parameter)
    # fraction is the selection when none is given (top_k, fraction and threshold all unset)
    table = {f"L0.attn.head{h}": float(h) for h in range(4)} | {f"L1.attn.head{h}": -float(h) for h in range(4)}
    for rule in (protect_then_add, stitch):
        assert registry.RULES[rule.__name__].defaults["fraction"] == 0.1
        assert rule(space, [table, {}]).selected[0] == ["L0.attn.head3"]  # ceil(0.1 * 8) = 1
        assert len(rule(space, [table, {}], top_k=3).selected[0]) == 3
    # and the MergeConfig resolves an unset density / normalize from the registry
    for name, entry in registry.STANDARD.items():
        cfg = MergeConfig(name, layer_owners=(0,))
        assert cfg.normalize_value == entry.defaults.get("normalize", False)
        assert cfg.density_value == entry.defaults.get("density", 1.0)


def test_config_choices_and_help_come_from_the_registry():
    from weightpatch.config import MergeStageConfig

    fields = MergeStageConfig.model_fields
    for field, names in (("method", registry.METHODS), ("mechanism", registry.MECHANISMS)):
        assert fields[field].annotation.__args__ == names
        for name in names[1:] if field == "mechanism" else names:
            assert f"{name}: " in fields[field].description
    assert fields["score_source"].annotation.__args__ == ("weight_patching", "magnitude", "snip", "random")
    with pytest.raises(WeightPatchError, match="unknown merge method 'slerp'"):
        MergeConfig("slerp")


def test_every_formula_is_in_docs_method_md():
    text = (Path(__file__).resolve().parents[2] / "docs" / "method.md").read_text()
    for entry in [*registry.STANDARD.values(), *registry.RULES.values(), *registry.SCORE_SOURCES.values()]:
        assert f"`{entry.name}`" in text, entry.name
        assert entry.formula in text, entry.name


# ---- new rules on hand-built masks ---------------------------------------------------------------
def test_protect_then_add_equals_its_formula(space):
    scores_if = {"L0.attn.head1": 1.0, "L1.mlp.neuron5": 0.5, "L0.mlp": 0.1}
    scores_math = {"L1.mlp": 9.0, "L0.attn.head2": 8.0}  # not the protected expert's: ignored
    standard = MergeConfig(weights=(1.0, 0.5), lam=0.8)
    m = protect_then_add(
        space, [scores_if, scores_math], top_k=2, standard=standard, strength=0.9, others=0.2, fraction=None
    )
    assert m.selected == [["L0.attn.head1", "L1.mlp.neuron5"], []]
    for seed, name in enumerate(space.shapes):
        base, (a, b) = _tensors(space, name, seed=seed)
        da, db = a - base, b - base
        protected = _mask(space, name, head=1) | _mask(space, name, neuron=5)
        expected = torch.where(protected, base + 0.9 * da + 0.2 * 0.8 * 0.5 * db, base + 0.8 * (da + 0.5 * db))
        torch.testing.assert_close(m.merge_tensor(name, base, [a, b]), expected, msg=name)
    # protecting the second expert uses its scores instead
    m = protect_then_add(space, [scores_if, scores_math], protect=1, top_k=1, fraction=None)
    assert m.selected == [[], ["L1.mlp"]]
    with pytest.raises(WeightPatchError, match="protect=2"):
        protect_then_add(space, [scores_if, scores_math], protect=2)


def test_stitch_equals_its_formula_with_mean_and_drop(space):
    # top half of each table (fraction 0.5 of 4 components = 2): A head1 + neuron5, B neuron5 + head2
    scores_a = {"L0.attn.head1": 1.0, "L1.mlp.neuron5": 0.2, "L1.mlp.neuron6": 0.1, "L0.attn.head3": 0.05}
    scores_b = {"L1.mlp.neuron5": 3.0, "L0.attn.head2": 2.0, "L0.attn.head3": 0.0, "L1.mlp.neuron7": -1.0}
    mean = stitch(space, [scores_a, scores_b], fraction=0.5, strength=0.7)
    drop = stitch(space, [scores_a, scores_b], fraction=0.5, strength=0.7, conflict="drop")
    assert mean.selected == [["L0.attn.head1", "L1.mlp.neuron5"], ["L1.mlp.neuron5", "L0.attn.head2"]]
    for seed, name in enumerate(space.shapes):
        base, (a, b) = _tensors(space, name, seed=seed)
        ma = (_mask(space, name, head=1) | _mask(space, name, neuron=5)).float()
        mb = (_mask(space, name, head=2) | _mask(space, name, neuron=5)).float()
        expected = base + 0.7 * (ma * (a - base) + mb * (b - base)) / torch.clamp(ma + mb, min=1)
        torch.testing.assert_close(mean.merge_tensor(name, base, [a, b]), expected, msg=name)
        alone = (ma + mb) == 1
        expected = base + 0.7 * torch.where(alone, ma * (a - base) + mb * (b - base), torch.zeros(()))
        torch.testing.assert_close(drop.merge_tensor(name, base, [a, b]), expected, msg=name)
    with pytest.raises(WeightPatchError, match="mean or drop"):
        stitch(space, [scores_a], conflict="max")


def test_fraction_selection_rounds_up_and_is_checked():
    scores = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0, "e": -1.0}
    assert select_components(scores, fraction=0.2) == ["a"]
    assert select_components(scores, fraction=0.3) == ["a", "b"]  # ceil(1.5)
    assert select_components(scores, fraction=1.0) == ["a", "b", "c", "d", "e"]
    assert select_components(scores, fraction=0.6, top_k=2) == ["a", "b"]
    with pytest.raises(WeightPatchError, match="fraction"):
        select_components(scores, fraction=0.0)


def test_consensus_equals_the_tall_mask_formula_by_hand():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 0.1, -2.0, 0.5])
    b = torch.tensor([1.0, 2.0, 2.0, 0.0])
    # tau = [2, 2.1, 0, 0.5]; m_a = |a| >= 0.6|b| = [1, 0, 1, 1]; m_b = |b| >= 0.6|a| = [1, 1, 1, 0]
    torch.testing.assert_close(consensus(base, [a, b], lam=0.5), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(consensus(base, [a, b], lam=0.5, min_agree=1), torch.tensor([1.0, 1.05, 0.0, 0.25]))
    # weights scale each delta inside the masks: w_b = 0.5 -> tau = [1.5, 1.1, -1, 0.5]
    # m_a = |a| >= 0.6 * 0.5|b| = [1, 0, 1, 1]; m_b = 0.5|b| >= 0.6|a| = [0, 1, 0, 0]: one vote each
    torch.testing.assert_close(consensus(base, [a, b], [1.0, 0.5]), torch.zeros(4))
    torch.testing.assert_close(consensus(base, [a, b], [1.0, 0.5], min_agree=1), torch.tensor([1.5, 1.1, -1.0, 0.5]))
    assert torch.equal(
        MergeConfig("consensus", lam=0.5).merge_tensor("x", base, [a, b]), consensus(base, [a, b], lam=0.5)
    )


def test_layer_swap_takes_each_layer_from_its_owner(space):
    cfg = MergeConfig("layer_swap", layer_owners=(1, -1), weights=(1.0, 0.5))
    for name in space.shapes:
        base, (a, b) = _tensors(space, name)
        out = cfg.merge_tensor(name, base, [a, b])
        if ".layers.0." in name:
            assert torch.equal(out, b), name
        elif ".layers.1." in name:
            assert torch.equal(out, base), name
        else:  # embeddings, final norm: task arithmetic
            torch.testing.assert_close(out, task_arithmetic(base, [a, b], [1.0, 0.5]))
    base, (a, b) = _tensors(space, Q)
    with pytest.raises(WeightPatchError, match="layer owner 2"):
        layer_swap(base, [a, b], (2, 0), Q)
    with pytest.raises(WeightPatchError, match="needs layer_owners"):
        MergeConfig("layer_swap")


# ---- score sources -------------------------------------------------------------------------------
def test_magnitude_scores_are_the_norm_of_each_components_delta(model, space):
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    expert = {n: t.clone() for n, t in base.items()}
    expert[Q][2 * HD : 3 * HD] += 1.0  # head 2: 8 query rows x 32 = 256 entries of 1 -> norm 16
    expert[UP1][3] += 2.0  # neuron 3: 32 entries of 2 -> norm sqrt(128)
    expert[DOWN1][:, 3] -= 0.5  # and its down column: 32 entries of 0.5 -> total sqrt(128 + 8)
    scores = magnitude_scores(space, base, expert, kinds=("head", "neuron"))
    assert set(scores) == {c.name for c in space.components(("head", "neuron"))}
    assert scores["L0.attn.head2"] == pytest.approx(16.0)
    assert scores["L1.mlp.neuron3"] == pytest.approx(136**0.5)
    assert all(v == 0 for c, v in scores.items() if c not in ("L0.attn.head2", "L1.mlp.neuron3"))
    assert select_components(scores, top_k=2) == ["L0.attn.head2", "L1.mlp.neuron3"]
    modules = magnitude_scores(space, base, expert, kinds=("module",))
    assert modules["L0.attn"] == pytest.approx(16.0) and modules["L1.mlp"] == pytest.approx(136**0.5)


def test_snip_scores_sum_theta_times_gradient_over_each_component(model, space):
    from conftest import tiny_tokenizer

    tok = tiny_tokenizer(tiny_config().vocab_size)
    texts = ["a b c d", "e f g"]
    scores = snip_scores(space, model, tok, texts, kinds=("head", "neuron"))
    # by hand: the mean next-token loss over the two texts (one batch, encoded as every prompt is:
    # left-padded), |theta * grad| summed over hand-written slices
    enc = encode(tok, texts)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    model.zero_grad()
    model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss.backward()
    params = dict(model.named_parameters())
    sal = {n: (p.detach() * p.grad).abs() for n, p in params.items()}
    model.zero_grad()
    head1 = sal[Q][HD : 2 * HD].sum() + sal[OPROJ][:, HD : 2 * HD].sum()
    neuron5 = sal[UP1][5].sum() + sal[GATE1][5].sum() + sal[DOWN1][:, 5].sum()
    assert scores["L0.attn.head1"] == pytest.approx(float(head1), rel=1e-5)
    assert scores["L1.mlp.neuron5"] == pytest.approx(float(neuron5), rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # gradients are not left behind
    with pytest.raises(WeightPatchError, match="at least one text"):
        snip_scores(space, model, tok, [])


def test_random_scores_are_seeded_reproducible_and_documented(space):
    first = random_scores(space, 7, kinds=("head",))
    assert first == random_scores(space, 7, kinds=("head",))
    assert first != random_scores(space, 8, kinds=("head",))
    rng = random.Random(7)  # the documented draw: U[0, 1) in the space's component order
    assert first == {c.name: rng.random() for c in space.components(("head",))}
    assert list(first) == [f"L{layer}.attn.head{h}" for layer in range(2) for h in range(4)]
    with pytest.raises(WeightPatchError, match="no components of kinds expert"):
        random_scores(space, 0, kinds=("expert",))


def test_every_registered_summary_is_one_line():
    for entry in [*registry.STANDARD.values(), *registry.RULES.values(), *registry.SCORE_SOURCES.values()]:
        assert "\n" not in entry.summary and re.match(r"^[a-zA-Z]", entry.summary), entry.name


# ---- the same rules through `wpatch merge` -------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from merging_testutil import build_tiny_checkpoints

    return build_tiny_checkpoints(tmp_path_factory.mktemp("rule-ckpts"))


def _merge_cli(*args):
    from typer.testing import CliRunner

    from weightpatch.cli.main import app

    return CliRunner().invoke(app, ["merge", *[str(a) for a in args], "--no-progress"])


def test_cli_merges_equal_the_python_functions_with_the_same_defaults(checkpoints, tmp_path):
    from weightpatch.merging.mechanism import component_space_for_checkpoint
    from weightpatch.merging.stream import Checkpoint, merge_checkpoints

    base, a, b = checkpoints
    space = component_space_for_checkpoint(base)
    cb, ca, cbb = Checkpoint(base), Checkpoint(a), Checkpoint(b)
    cases = {
        "stitch-magnitude": (
            ("--mechanism", "stitch", "--score-source", "magnitude"),
            stitch(space, [magnitude_scores(space, cb, ca), magnitude_scores(space, cb, cbb)]),
        ),
        "protect-random": (
            ("--mechanism", "protect_then_add", "--score-source", "random", "--seed", "3", "--top-k", "4"),
            protect_then_add(space, [random_scores(space, "3:0"), {}], top_k=4),
        ),
        "consensus": (("--method", "consensus", "--min-agree", "1"), MergeConfig("consensus", min_agree=1)),
    }
    for name, (flags, merger) in cases.items():
        result = _merge_cli(base, a, b, "-o", tmp_path / name, *flags)
        assert result.exit_code == 0, (name, result.output)
        expected = merge_checkpoints(base, [a, b], tmp_path / f"{name}-py", merger)
        got, want = Checkpoint(tmp_path / name), Checkpoint(expected)
        for tensor in got.names:
            assert torch.equal(got.get(tensor), want.get(tensor)), (name, tensor)


def test_cli_refuses_snip_without_data_and_layer_swap_without_owners(checkpoints, tmp_path):
    base, a, b = checkpoints
    result = _merge_cli(base, a, b, "-o", tmp_path / "s", "--mechanism", "stitch", "--score-source", "snip")
    assert result.exit_code == 2 and "error: --score-source snip needs one --snip-data file per expert" in result.output
    result = _merge_cli(base, a, b, "-o", tmp_path / "l", "--method", "layer_swap")
    assert result.exit_code == 2 and "layer_swap needs layer_owners" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "s").exists()
