import pytest

from conftest import tiny_texts
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
