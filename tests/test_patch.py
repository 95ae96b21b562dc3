import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, make_pair, token_batch
from weightpatch.pair import load_pair
from weightpatch.patch import patched


@pytest.fixture(scope="module", params=FAMILIES)
def pair_dirs(request, tmp_path_factory):
    return make_pair(request.param, tmp_path_factory.mktemp(request.param))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(model, before):
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_patch_everything_gives_specialized_logits_and_nothing_gives_base(pair_dirs):
    base_dir, sft_dir = pair_dirs
    pair = load_pair(base_dir, sft_dir)
    sft = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32).eval()
    ids = token_batch()
    base_logits, sft_logits = logits(pair.model, ids), logits(sft, ids)
    assert not torch.allclose(base_logits, sft_logits)
    before = snapshot(pair.model)
    with patched(pair.model, pair.donor, pair.space, pair.space.everything()):
        assert torch.equal(logits(pair.model, ids), sft_logits)
    assert_bit_identical(pair.model, before)
    with patched(pair.model, pair.donor, pair.space, []):
        assert torch.equal(logits(pair.model, ids), base_logits)
    assert torch.equal(logits(pair.model, ids), base_logits)


def test_knockout_direction_everything_gives_base_logits(pair_dirs):
    base_dir, sft_dir = pair_dirs
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    pair = load_pair(base_dir, sft_dir, receiver="specialized")
    ids = token_batch()
    with patched(pair.model, pair.donor, pair.space, pair.space.everything()):
        assert torch.equal(logits(pair.model, ids), logits(base, ids))


def test_restore_is_bit_exact_when_the_body_raises(pair_dirs):
    pair = load_pair(*pair_dirs)
    before = snapshot(pair.model)
    with (
        pytest.raises(RuntimeError, match="boom"),
        patched(pair.model, pair.donor, pair.space, ["L1", "L0.attn.head1", "embed"], alpha=0.3),
    ):
        raise RuntimeError("boom")
    assert_bit_identical(pair.model, before)


@pytest.mark.parametrize("component", ["L1.attn.head2", "L2.mlp.neuron5", "L0.mlp", "unembed"])
def test_patch_changes_exactly_the_owned_slices(pair_dirs, component):
    pair = load_pair(*pair_dirs)
    sft = {n: p for n, p in AutoModelForCausalLM.from_pretrained(pair_dirs[1], dtype=torch.float32).named_parameters()}
    before = snapshot(pair.model)
    owned = {s.name: s for s in pair.space.resolve(component)}
    with patched(pair.model, pair.donor, pair.space, [component]):
        for name, p in pair.model.named_parameters():
            changed = p != before[name]
            if name not in owned:
                assert not changed.any(), f"{component} changed {name}"
                continue
            s = owned[name]
            expected = torch.zeros_like(changed)
            if s.is_full:
                expected[...] = True
            else:
                for a, b in s.ranges:
                    expected[(slice(None),) * s.dim + (slice(a, b),)] = True
            assert torch.equal(changed, expected), f"{component} on {name}"
            assert torch.equal(p[expected], sft[name][expected])


def test_alpha_interpolates(pair_dirs):
    pair = load_pair(*pair_dirs)
    name = pair.space.resolve("L1.mlp")[0].name
    base_value = pair.model.get_parameter(name).detach().clone()
    donor_value = pair.donor.read(pair.space.resolve("L1.mlp")[0])
    with patched(pair.model, pair.donor, pair.space, ["L1.mlp"], alpha=0.25):
        torch.testing.assert_close(pair.model.get_parameter(name), base_value + 0.25 * (donor_value - base_value))


def test_patch_records_its_slices_and_the_full_originals(pair_dirs):
    pair = load_pair(*pair_dirs)
    components = ["L1.mlp", "L0.attn.head1"]
    before = snapshot(pair.model)
    with patched(pair.model, pair.donor, pair.space, components) as patch:
        assert patch.slices == pair.space.resolve_all(components)
        full = next(s.name for s in patch.slices if s.is_full)
        assert torch.equal(patch.original(full), before[full])
        assert not torch.equal(pair.model.get_parameter(full), before[full])
        partial = next(s.name for s in patch.slices if not s.is_full)
        with pytest.raises(KeyError, match="not fully patched"):
            patch.original(partial)


def test_donor_values_are_cast_to_the_receiver_dtype(pair_dirs):
    pair = load_pair(*pair_dirs, dtype="bfloat16")
    sft = dict(AutoModelForCausalLM.from_pretrained(pair_dirs[1], dtype=torch.float32).named_parameters())
    with patched(pair.model, pair.donor, pair.space, ["L1.mlp", "L0.attn.head2"]):  # whole and row/column slices
        for piece in pair.space.resolve_all(["L1.mlp", "L0.attn.head2"]):
            value = pair.model.get_parameter(piece.name)
            donor = sft[piece.name].to(torch.bfloat16)
            if not piece.is_full:
                value, donor = (t.index_select(piece.dim, piece.index()) for t in (value, donor))
            assert value.dtype == torch.bfloat16
            assert torch.equal(value, donor)


@pytest.mark.parametrize("receiver", ["base", "specialized"])
def test_patched_while_running_gives_the_checkpoint_bit_for_bit_and_restores(pair_dirs, receiver):
    """Each block patched only while it runs (hooks): the other checkpoint's logits and hidden
    states exactly, in both directions, the receiver restored after every forward and on exit, also
    when a forward stops inside a block (run_segment's early stop)."""
    from weightpatch.patch import patched_while_running
    from weightpatch.runner import Batch, run_segment

    base_dir, sft_dir = pair_dirs
    pair = load_pair(base_dir, sft_dir, receiver=receiver)
    other = AutoModelForCausalLM.from_pretrained(sft_dir if receiver == "base" else base_dir, dtype=torch.float32)
    ids = token_batch()
    with torch.no_grad():
        expected = other.eval()(ids, output_hidden_states=True)
    before = snapshot(pair.model)
    with patched_while_running(pair.model, pair.donor, pair.space, pair.space.everything()) as model:
        assert_bit_identical(model, before)  # nothing patched between forwards
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        assert torch.equal(out.logits, expected.logits)
        for got, want in zip(out.hidden_states, expected.hidden_states, strict=True):
            assert torch.equal(got, want)
        assert_bit_identical(model, before)
        batch = Batch(ids, torch.ones_like(ids), torch.arange(ids.shape[1]).expand_as(ids))
        with torch.no_grad():
            mid = run_segment(model, pair.space, batch, stop=1)[0]
        assert_bit_identical(model, before)
    with torch.no_grad(), patched(pair.model, pair.donor, pair.space, pair.space.everything()):
        assert torch.equal(mid, run_segment(pair.model, pair.space, batch, stop=1)[0])
    with torch.no_grad(), pair.as_model("base" if receiver == "specialized" else "specialized", streamed=True) as m:
        assert torch.equal(m(ids).logits, expected.logits)
    assert_bit_identical(pair.model, before)
