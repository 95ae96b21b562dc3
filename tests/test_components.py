import re
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES, tiny_model
from weightpatch.components import Component, ComponentSpace, ParamSlice, merge_slices
from weightpatch.errors import ComponentError


def masks(space: ComponentSpace, slices: list[ParamSlice]) -> dict[str, torch.Tensor]:
    """Boolean element masks per parameter for a list of slices."""
    out = {}
    for s in slices:
        m = out.setdefault(s.name, torch.zeros(space.shapes[s.name], dtype=torch.bool))
        if s.is_full:
            m[...] = True
        else:
            for a, b in s.ranges:
                m[(slice(None),) * s.dim + (slice(a, b),)] = True
    return out


def same_masks(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_names_round_trip_for_every_component(family):
    space = ComponentSpace.from_model(tiny_model(family))
    components = list(space.components())
    assert len(components) == len({c.name for c in components})
    for c in components:
        assert Component.parse(c.name) == c
        assert space.parse(c.name) == c
        assert space.resolve(c), f"{c.name} owns no parameters"


@pytest.mark.parametrize("family", FAMILIES)
def test_vocabulary_covers_every_parameter_and_layer_is_union_of_modules(family):
    space = ComponentSpace.from_model(tiny_model(family))
    assert space.uncovered_parameters() == []
    for layer in range(space.num_layers):
        top_modules = [c for c in space.components(kinds=("module",), layers=[layer]) if "." not in c.module]
        top_modules += [c for c in space.components(kinds=("module",), layers=[layer]) if c.module.startswith("norm.")]
        assert same_masks(masks(space, space.resolve(f"L{layer}")), masks(space, space.resolve_all(top_modules)))


def assert_tiles(space: ComponentSpace, parts: list, whole: list) -> None:
    """The parts' slices cover exactly the whole's, except output biases that no single part owns."""
    part_masks, whole_masks = masks(space, space.resolve_all(parts)), masks(space, space.resolve_all(whole))
    assert same_masks(part_masks, {k: v for k, v in whole_masks.items() if k in part_masks})
    assert all(name.endswith("bias") for name in set(whole_masks) - set(part_masks))


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_and_neurons_tile_their_projections(family):
    """All heads together own all of W_Q (plus bias and a per-channel q norm) and W_O, with
    ``include_kv`` also all of W_K and W_V; all neurons own all of the MLP."""
    space = ComponentSpace.from_model(tiny_model(family))
    heads = list(space.components(kinds=("head",), layers=[1]))
    norms = {m: f"L1.attn.{m}" for m in ("q_norm", "k_norm")}
    sliced = {m for m in norms for r in [*space.spec.head.query, *space.spec.head.key_value] if f".{m}." in r.param}
    q_whole = ["L1.attn.q", "L1.attn.o", *(norms[m] for m in sliced if m == "q_norm")]
    assert_tiles(space, heads, q_whole)
    with_kv = ComponentSpace.from_model(tiny_model(family), include_kv=True)
    assert_tiles(with_kv, heads, [*q_whole, "L1.attn.k", "L1.attn.v", *(norms[m] for m in sliced if m == "k_norm")])
    assert_tiles(space, list(space.components(kinds=("neuron",), layers=[1])), ["L1.mlp"])


def test_disjoint_heads_and_kv_groups():
    space = ComponentSpace.from_model(tiny_model("llama"))  # 4 heads, 2 KV heads
    h0, h1 = masks(space, space.resolve("L0.attn.head0")), masks(space, space.resolve("L0.attn.head1"))
    for name in h0:
        assert not (h0[name] & h1[name]).any()
    with_kv = ComponentSpace.from_model(tiny_model("llama"), include_kv=True)
    k0 = masks(with_kv, with_kv.resolve("L0.attn.head0"))
    k1 = masks(with_kv, with_kv.resolve("L0.attn.head1"))
    k2 = masks(with_kv, with_kv.resolve("L0.attn.head2"))
    kname = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(k0[kname], k1[kname])  # heads 0 and 1 share KV group 0
    assert not (k0[kname] & k2[kname]).any()
    assert k0[kname].sum() == 8 * 32  # head_dim rows x hidden columns


def test_gpt_neox_head_slices_are_interleaved():
    space = ComponentSpace.from_model(tiny_model("gpt_neox"))
    (qkv, *_rest) = space.resolve("L0.attn.head1")
    assert qkv.name.endswith("query_key_value.weight") and qkv.ranges == ((24, 32),)  # 3*8*1 .. +8


def test_merge_slices_unions_ranges_and_full_absorbs():
    a = ParamSlice("w", 0, ((0, 2),))
    b = ParamSlice("w", 0, ((1, 4), (6, 7)))
    assert merge_slices([a, b]) == [ParamSlice("w", 0, ((0, 4), (6, 7)))]
    assert merge_slices([a, ParamSlice("w")]) == [ParamSlice("w")]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("L7", "layer 7 is out of range"),
        ("L9.attn.head2", "layer 9 is out of range.*did you mean 'L2.attn.head2'"),
        ("L1.attn.head9", "head 9 is out of range"),
        ("L1.mlp.neuron480", "neuron 480 is out of range"),
        ("L1.mlp.gatee", "did you mean 'L1.mlp.gate'"),
        ("unembedding", "did you mean 'unembed'"),
        ("L1..x", "cannot parse"),
    ],
)
def test_unknown_components_get_clear_errors(name, message):
    space = ComponentSpace.from_model(tiny_model("llama"))
    with pytest.raises(ComponentError, match=message):
        space.parse(name)


def test_param_slice_numel_counts_entries_by_hand():
    from weightpatch.components import ParamSlice

    assert ParamSlice("w").numel((6, 4)) == 24
    assert ParamSlice("w", dim=0, ranges=((1, 3), (4, 5))).numel((6, 4)) == 3 * 4  # rows 1, 2, 4
    assert ParamSlice("w", dim=1, ranges=((0, 1),)).numel((6, 4, 5)) == 6 * 1 * 5
    assert ParamSlice("w", expert=2).numel((3, 6, 4)) == 24  # one expert's slab
    assert ParamSlice("w", dim=2, ranges=((1, 3),), expert=0).numel((3, 6, 4)) == 6 * 2


def test_out_of_range_components_name_the_range_and_the_nearest_valid_name(llama_pair_dirs):
    from weightpatch.pair import load_pair

    space = load_pair(*llama_pair_dirs).space  # 3 layers, 4 heads, 48 neurons
    cases = {
        "L3.mlp": r"^unknown component 'L3\.mlp': layer 3 is out of range \(the model has layers 0\.\.2\); "
        r"did you mean 'L2\.mlp'\?$",
        "L1.attn.head4": r"^unknown component 'L1\.attn\.head4': head 4 is out of range \(layer 1 has heads 0\.\.3\)",
        "L1.mlp.neuron48": r"^unknown component 'L1\.mlp\.neuron48': neuron 48 is out of range "
        r"\(layer 1 has 48 neurons\)",
        "L1.mlpx": r"^unknown component 'L1\.mlpx': no module 'mlpx' in layer 1; did you mean 'L1\.mlp'\?$",
    }
    for name, message in cases.items():
        with pytest.raises(ComponentError, match=message):
            space.validate(name)
    for name in ("L2.mlp", "L1.attn.head3", "L1.mlp.neuron47", "L0"):
        assert space.validate(name).name == name


def test_first_affected_layer_module_paths_and_neuron_readout_by_hand():
    """Written out from transformers' module trees: the embeddings (token and GPT-2's positions) feed
    block 0; an untied unembedding and the final norm come after the last block, a tied one (GPT-2's
    lm_head is wte) feeds block 0; module paths and the down projection's neuron dim per layout."""
    llama = ComponentSpace.from_model(tiny_model("llama"))
    gpt2 = ComponentSpace.from_model(tiny_model("gpt2"))
    assert [llama.first_affected_layer(n) for n in ("embed", "unembed", "norm.final", "L1.attn.head1", "L2")] == [
        0,
        3,
        3,
        1,
        2,
    ]
    assert [gpt2.first_affected_layer(n) for n in ("embed", "pos_embed", "unembed", "norm.final")] == [0, 0, 0, 3]
    # what the model's head reads (the behaviour objective keeps these patched through its readout)
    names = ("embed", "unembed", "norm.final", "L2", "L2.mlp.neuron0")
    assert [llama.acts_after_last_block(n) for n in names] == [False, True, True, False, False]
    assert [gpt2.acts_after_last_block(n) for n in ("embed", "pos_embed", *names[1:])] == [
        True,  # GPT-2's lm_head is the token embedding
        False,
        True,
        True,
        False,
        False,
    ]
    assert [llama.module_path(1, m) for m in ("attn", "mlp", "attn.q", "mlp.down")] == [
        "model.layers.1.self_attn",
        "model.layers.1.mlp",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert [gpt2.module_path(1, m) for m in ("attn", "mlp", "mlp.down")] == [
        "transformer.h.1.attn",
        "transformer.h.1.mlp",
        "transformer.h.1.mlp.c_proj",
    ]
    with pytest.raises(
        ComponentError,
        match=r"^L1\.attn\.q is a slice of a fused parameter in the gpt2 layout and has no separate output to "
        r"patch; use the heads or the whole 'attn'/'mlp' module$",
    ):
        gpt2.module_path(1, "attn.q")
    with pytest.raises(ComponentError, match=r"^no module 'mlp\.router' in layer 1 of this llama model$"):
        llama.module_path(1, "mlp.router")  # a dense family has no router (it said "a slice of a fused parameter")
    # Llama's down_proj.weight is (hidden, intermediate): neuron j is column j; GPT-2's Conv1D
    # c_proj.weight is (intermediate, hidden): row j
    assert llama.neuron_readout(1) == ("model.layers.1.mlp.down_proj.weight", 1)
    assert gpt2.neuron_readout(2) == ("transformer.h.2.mlp.c_proj.weight", 0)


def test_unknown_names_get_the_nearest_valid_one():
    space = ComponentSpace.from_model(tiny_model("llama"))  # layers 0..2, heads 0..3
    cases = {
        "L3.attn": "layer 3 is out of range (the model has layers 0..2); did you mean 'L2.attn'?",
        "L7.mlp.neuron4": "layer 7 is out of range (the model has layers 0..2); did you mean 'L2.mlp.neuron4'?",
        "L0.atn": "no module 'atn' in layer 0; did you mean 'L0.attn'?",
        "L2.mlp.gat": "no module 'mlp.gat' in layer 2; did you mean 'L2.mlp.gate'?",
        "foo": "no module 'foo' at model level",
        "embd": "no module 'embd' at model level; did you mean 'embed'?",
        "L1.x": "no module 'x' in layer 1; did you mean 'L1'?",  # whole layers are candidates too
        "L1.qq": "no module 'qq' in layer 1; did you mean 'L1.attn.q'?",  # similarity 0.57: cutoff 0.5
        "L1.mlp.neuron99": "neuron 99 is out of range (layer 1 has 48 neurons); did you mean 'L1.mlp.neuron0'?",
        "L0.mlp.neuron99": "neuron 99 is out of range (layer 0 has 48 neurons); did you mean 'L0.mlp.neuron0'?",
        "L3.mlp.neuron4": "layer 3 is out of range (the model has layers 0..2); did you mean 'L2.mlp.neuron4'?",
    }
    for name, problem in cases.items():
        with pytest.raises(ComponentError, match="^" + re.escape(f"unknown component {name!r}: {problem}") + "$"):
            space.validate(name)
    with pytest.raises(
        ComponentError, match=r"^norm\.final has no activation site; model-level modules other than 'embed' cannot be$"
    ):
        space.site("norm.final")


def test_merge_slices_of_experts_and_its_refusals():
    """A dim-0 slice of whole experts absorbs slices inside the experts it covers, and only those;
    slices that cannot form one slice are refused with the parameter, the dims and the expert."""
    whole = ParamSlice("w", 0, ((2, 4),))  # experts 2 and 3 whole
    inside = [ParamSlice("w", 1, ((0, 2),), expert=e) for e in (0, 3)]
    assert merge_slices([whole, *inside]) == [whole, ParamSlice("w", 1, ((0, 2),), expert=0)]
    refusals = {
        "slices of w along different dims [0, 1] cannot be merged": [
            ParamSlice("w", 0, ((0, 1),)),
            ParamSlice("w", 1, ((0, 1),)),
        ],
        "slices of w along dim 1 and inside expert 0 cannot be merged": [ParamSlice("w", 1, ((0, 1),)), inside[0]],
        "slices of w in expert 3 along different dims [1, 2]": [inside[1], ParamSlice("w", 2, ((0, 1),), expert=3)],
    }
    for message, slices in refusals.items():
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            merge_slices(slices)


@pytest.mark.parametrize("extra", [8, 9])
def test_parameters_no_module_owns_are_listed_eight_at_most(extra):
    from weightpatch.errors import ArchitectureDescriptionError

    model = tiny_model("llama")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    names = [f"model.extra{i}.weight" for i in range(extra)]
    shapes |= dict.fromkeys(names, (2,))
    listed = ", ".join(sorted(names)[:8]) + (" and 1 more" if extra == 9 else "")
    message = (
        f"llama.json: no module owns the parameters {listed}; add them to 'modules' (per layer) or 'globals' "
        "of the description"
    )
    with pytest.raises(ArchitectureDescriptionError, match="^" + re.escape(message) + "$"):
        ComponentSpace.from_shapes(model.config, shapes)


def test_neuron_count_rules_skip_absent_parameters_and_read_stride_and_offset(tmp_path):
    """The neuron count is the largest for which every present neuron rule stays in its tensor: a
    rule on a parameter the model lacks (a bias) is skipped, not the end of the rules; a stride of 2
    halves the count of a 48-row gate projection, an offset of 8 leaves 40 rows."""
    import json

    from weightpatch.architecture import load_architecture

    shipped = Path(__file__).resolve().parents[1] / "src" / "weightpatch" / "architectures" / "llama.json"
    model = tiny_model("llama")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    gate = {"param": "mlp.gate_proj.weight", "dim": 0}
    variants = {
        "absent_first": ([{"param": "mlp.gate_proj.bias", "dim": 0}], 48),
        "strided": ([{**gate, "stride": "2"}], 24),
        "offset": ([{**gate, "offset": "8"}], 40),
    }
    for name, (rules, count) in variants.items():
        raw = json.loads(shipped.read_text())
        raw["neuron"] = rules + [r for r in raw["neuron"] if r["param"] != gate["param"] or name == "absent_first"]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(raw))
        spec = load_architecture(path)
        space = ComponentSpace(spec, spec.dims(model.config), shapes)
        assert space.num_neurons(0) == count, name


def test_numel_is_an_integer_count():
    slices = [ParamSlice("w"), ParamSlice("w", 1, ((0, 3), (5, 6))), ParamSlice("w", 2, ((1, 2),), expert=1)]
    counts = [s.numel((4, 6, 5)) for s in slices]
    assert counts == [120, 80, 6] and all(type(n) is int for n in counts)
