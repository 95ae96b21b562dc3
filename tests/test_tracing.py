import pandas as pd
import pytest

from conftest import make_pair, tiny_texts
from test_roles import PLANTED_HEAD, PLANTED_NEURONS, planted_scorer
from weightpatch.anchors import build_anchor
from weightpatch.pair import load_pair
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen
from weightpatch.tracing import (
    candidates_for,
    hierarchy,
    is_upstream,
    supplier_graph,
    supplier_overlap,
    top_suppliers,
    trace_suppliers,
)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_scorer(tmp_path_factory.mktemp("planted"))


def test_tracing_from_the_planted_head_finds_the_planted_neurons(planted):
    edges = trace_suppliers(planted, [PLANTED_HEAD], method="exact")
    top = top_suppliers(edges, k=2)
    assert sorted(top["supplier"]) == sorted(PLANTED_NEURONS)
    assert (top["supply"] > 0.5).all()  # each recovers most of the head's output change alone
    rest = edges[~edges["supplier"].isin(PLANTED_NEURONS)]
    assert (rest["supply"].abs() < 1e-6).all()  # nothing else differs between the models
    assert set(edges["supplier_layer"]) <= {0, 1}  # strictly upstream of a layer-2 head


def test_first_order_screening_then_exact_verification(planted):
    edges = trace_suppliers(planted, [PLANTED_HEAD, "L2.mlp"], method="first_order", verify_top=3)
    for target in (PLANTED_HEAD, "L2.mlp"):
        top = top_suppliers(edges[edges["target"] == target], k=2)
        assert sorted(top["supplier"]) == sorted(PLANTED_NEURONS)
        assert set(top["method"]) == {"exact"}
    # the same-layer attention head supplies the MLP (attention runs first), never the reverse
    assert ((edges["target"] == "L2.mlp") & (edges["supplier"] == PLANTED_HEAD)).any()


def test_overlap_hierarchy_and_graph(planted):
    edges = trace_suppliers(planted, [PLANTED_HEAD], method="exact")
    components = list(planted.pair.space.components(kinds=("head", "neuron")))
    weight = ExactScreen(planted).run(components, progress=False)
    overlap = supplier_overlap(edges, weight, k=2, kind="neuron")
    assert overlap["fraction"] == 1.0 and sorted(overlap["shared"]) == sorted(PLANTED_NEURONS)
    levels = hierarchy(edges, planted.pair.space, anchor_layer=planted.layer)
    by_name = levels.set_index("component")["level_name"].to_dict()
    assert {n: by_name[n] for n in PLANTED_NEURONS} == dict.fromkeys(PLANTED_NEURONS, "source")
    assert by_name[PLANTED_HEAD] == "router" and by_name["unembed"] == "unembedding"
    assert levels["level"].is_monotonic_increasing
    graph = supplier_graph(edges, k=2)
    try:
        import networkx  # noqa: F401
    except ImportError:
        assert len(graph) == 2
    else:
        assert sorted(graph.predecessors(PLANTED_HEAD)) == sorted(PLANTED_NEURONS)


def test_upstream_rule(llama_pair_dirs):
    space = load_pair(*llama_pair_dirs).space
    assert is_upstream(space, "L0.mlp.neuron1", "L1.attn.head0")
    assert not is_upstream(space, "L1.mlp.neuron1", "L1.attn.head0")
    assert is_upstream(space, "L1.attn.head2", "L1.mlp")  # attention before the MLP of its block
    assert not is_upstream(space, "L1.attn.head0", "L1.attn.head1")
    assert not is_upstream(space, "L1.attn.head0", "L1.attn.head0")
    assert is_upstream(space, "embed", "L0.attn.head0")
    assert not is_upstream(space, "norm.final", "L2.mlp")
    cands = candidates_for(space, ["L1.attn.head0"])
    assert {c.layer for c in cands} == {0} and len(cands) == 4 + 48


def test_all_token_positions_and_a_noisy_pair(llama_pair_dirs):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 5))
    for positions in ("last", "all"):
        edges = trace_suppliers(scorer, ["L2.attn.head0"], kinds=("head", "layer"), positions=positions)
        whole = edges.set_index("supplier")["supply"]
        # smoke test on a fully perturbed pair: whole blocks as candidates, both readouts
        assert set(whole.index) >= {"L0", "L1"}
        assert whole.notna().all()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2", "qwen3"])
@pytest.mark.parametrize("method", ["exact", "first_order"])
def test_targets_in_several_layers_equal_each_target_traced_alone(family, method, tmp_path):
    # A supplier above the lowest target used to re-run only the blocks from its own layer while
    # reading every target's output: KeyError for the lower target's site.
    pair = load_pair(*make_pair(family, tmp_path))
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 5))
    targets = ["L0.mlp", "L1.attn.head1", "L2.mlp"]
    few = [c for c in pair.space.components(kinds=("head", "neuron")) if c.kind == "head" or c.index < 3]
    together = trace_suppliers(scorer, targets, candidates=few, method=method)
    for target in targets:
        alone = trace_suppliers(scorer, [target], candidates=few, method=method)
        mine = together[together["target"] == target].reset_index(drop=True)
        assert len(alone) > 0
        # every supplier is traced only to the targets above it
        assert all(is_upstream(pair.space, s, target) for s in mine["supplier"])
        if method == "exact":  # the same computation for each target: bit-equal
            pd.testing.assert_frame_equal(mine, alone)
        else:  # one backward per target either way; summation order may differ in the last bits
            pd.testing.assert_frame_equal(mine, alone, check_exact=False, rtol=1e-9, atol=1e-12)


def test_demo_pair_targets_in_two_layers():
    # The reproduction: the demo pair, anchor at layer 3, targets L1.attn and L3.mlp.
    from weightpatch import demo

    paths = demo.paths()
    pair = load_pair(paths.base, paths.specialized)
    texts = [p.prompt for p in demo.prompts("heldout")[:8]]
    anchor = build_anchor(pair, texts, None, layer=3, method="model_diff")
    scorer = AnchorScorer(pair, anchor, texts)
    edges = trace_suppliers(scorer, ["L1.attn", "L3.mlp"], kinds=("head",), method="exact")
    low = edges[edges["target"] == "L1.attn"]
    high = edges[edges["target"] == "L3.mlp"]
    assert set(low["supplier_layer"]) == {0} and set(high["supplier_layer"]) == {0, 1, 2, 3}
    assert edges["supply"].notna().all()
