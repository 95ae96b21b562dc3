import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_pair, tiny_texts
from test_roles import PLANTED_HEAD, PLANTED_NEURONS, planted_scorer
from weightpatch.anchors import build_anchor
from weightpatch.pair import load_pair
from weightpatch.patch import patched
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


# ---- the edge-table functions on designed edges (values written out by hand) -------------------
def _edges(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["supplier", "target", "supply", "method", "supplier_kind"])


def test_top_suppliers_keep_the_k_largest_per_target_at_or_above_the_floor():
    from weightpatch.tracing import top_suppliers

    edges = _edges(
        [
            ("a", "T1", 0.3, "exact", "neuron"),
            ("b", "T1", 0.1, "exact", "neuron"),
            ("c", "T1", 0.05, "exact", "neuron"),
            ("d", "T1", 0.01, "exact", "neuron"),
            ("a", "T2", 0.2, "exact", "neuron"),
            ("e", "T2", 0.4, "exact", "head"),
        ]
        + [(f"n{i}", "T3", 0.5 + i / 100, "exact", "neuron") for i in range(6)]
    )
    kept = top_suppliers(edges, k=2, min_supply=0.05)
    assert kept.columns.tolist() == edges.columns.tolist() and kept.index.tolist() == list(range(6))
    assert list(zip(kept["supplier"], kept["target"], strict=True)) == [
        ("n5", "T3"),
        ("n4", "T3"),
        ("e", "T2"),
        ("a", "T1"),
        ("a", "T2"),
        ("b", "T1"),
    ]
    with_floor = top_suppliers(edges, k=3, min_supply=0.05)
    assert sorted(with_floor[with_floor["target"] == "T1"]["supplier"]) == ["a", "b", "c"]  # 0.05 itself is kept
    default = top_suppliers(edges)  # k = 5, no floor
    assert (default["target"] == "T3").sum() == 5 and (default["target"] == "T1").sum() == 4


def test_supplier_graph_carries_supply_and_method_on_its_edges():
    from weightpatch.tracing import supplier_graph

    edges = _edges([("a", "T1", 0.3, "exact", "neuron"), ("b", "T1", 0.1, "first_order", "head")])
    graph = supplier_graph(edges, k=5)
    assert sorted(graph.edges(data=True)) == [
        ("a", "T1", {"weight": 0.3, "method": "exact"}),
        ("b", "T1", {"weight": 0.1, "method": "first_order"}),
    ]
    assert list(supplier_graph(edges, min_supply=0.2).edges) == [("a", "T1")]
    six = _edges([(f"n{j}", "T1", 0.1 + j / 100, "exact", "neuron") for j in range(6)])
    assert sorted(u for u, _ in supplier_graph(six).edges) == [f"n{j}" for j in range(1, 6)]  # k = 5


def test_supplier_overlap_by_hand(llama_pair_dirs):
    from weightpatch.results import ScoreTable, score_row
    from weightpatch.tracing import supplier_overlap

    space = load_pair(*llama_pair_dirs).space
    neurons = [f"L0.mlp.neuron{i}" for i in range(12)]
    # supplies: neuron i gives 0.01 * (12 - i) to T1, and neuron 11 also 0.5 to T2 (its max counts)
    rows = [(n, "T1", 0.01 * (12 - i), "exact", "neuron") for i, n in enumerate(neurons)]
    rows += [(neurons[11], "T2", 0.5, "exact", "neuron"), ("L0.attn.head1", "T1", 0.9, "exact", "head")]
    edges = _edges(rows)
    table = ScoreTable.from_rows(
        [score_row(space.parse(n), "exact", float(i), 0.0, 1) for i, n in enumerate(neurons)]  # reversed order
        + [score_row(space.parse("L0.mlp.neuron0"), "first_order", 99.0, 0.0, 1)]
        + [score_row(space.parse("L0.attn.head1"), "exact", 99.0, 0.0, 1)]
    )
    out = supplier_overlap(edges, table)  # k = 10, exact, neurons
    traced = [neurons[11], *neurons[:9]]
    wp = neurons[::-1][:10]
    assert out == {
        "k": 10,
        "fraction": len(set(traced) & set(wp)) / 10,
        "traced": traced,
        "weight_patching": wp,
        "shared": [c for c in traced if c in wp],
    }
    assert out["fraction"] == pytest.approx(0.8)
    floor = supplier_overlap(edges, table, k=3, min_supply=0.11)  # 0.11 itself is kept
    assert floor["traced"] == [neurons[11], neurons[0], neurons[1]] and floor["shared"] == [neurons[11]]
    heads = supplier_overlap(edges, table, k=1, kind=None)
    assert heads["traced"] == ["L0.attn.head1"] and heads["weight_patching"] == ["L0.attn.head1"]
    first_order = supplier_overlap(edges, table, k=1, method="first_order")
    assert first_order["weight_patching"] == ["L0.mlp.neuron0"]
    empty = supplier_overlap(edges, table, min_supply=1.0)
    assert empty["traced"] == [] and np.isnan(empty["fraction"])


def test_hierarchy_levels_by_hand(llama_pair_dirs):
    from weightpatch.tracing import hierarchy

    space = load_pair(*llama_pair_dirs).space
    edges = _edges(
        [
            ("L0.mlp.neuron1", "L1.attn.head0", 0.3, "exact", "neuron"),
            ("L0.attn.head2", "L1.attn.head3", 0.01, "exact", "head"),  # below the 0.05 floor
            ("L1.attn.head0", "L1.mlp", 0.2, "exact", "head"),  # a target that also supplies: not a source
            ("L0.mlp.neuron1", "L1", 0.1, "exact", "neuron"),
        ]
    )
    roles = pd.DataFrame(
        [
            ("L2.attn.head1", 2, True),  # above the top router (layer 1): execution
            ("L1.attn", 1, True),  # at the top router's layer: not
            ("L2.mlp", 2, False),  # not high in activation space: not
            ("L0.attn", 0, True),
        ],
        columns=["component", "layer", "activation_high"],
    )
    levels = hierarchy(edges, space, anchor_layer=0, roles=roles)
    assert levels["layer"].dtype == "Int64"
    got = [
        (c, lv, name, None if pd.isna(layer) else int(layer), t)
        for c, lv, name, layer, t in levels.itertuples(index=False)
    ]
    assert got == [
        ("L0.mlp.neuron1", 0, "source", 0, True),
        ("L1.attn.head0", 1, "router", 1, True),
        ("L1.attn.head3", 1, "router", 1, False),
        ("L1.mlp", 1, "router", 1, True),
        ("L1", 1, "router", 1, True),
        ("L2.attn.head1", 2, "execution", 2, False),
        ("L2", 2, "execution", 2, False),  # L1 is a router already: listed once
        ("norm.final", 3, "unembedding", None, False),
        ("unembed", 3, "unembedding", None, False),
    ]
    no_edges = hierarchy(edges.iloc[:0], space, anchor_layer=1, roles=roles)  # no router: every high one counts
    assert no_edges["component"].tolist() == ["L2.attn.head1", "L1.attn", "L0.attn", "L2", "norm.final", "unembed"]
    strict = hierarchy(edges, space, anchor_layer=1, k=1, min_supply=0.25)  # only neuron1 -> head0 is kept
    assert strict["component"].tolist()[:5] == ["L0.mlp.neuron1", "L1.attn.head0", "L1.attn.head3", "L1.mlp", "L1"]
    assert strict["traced"].tolist()[:5] == [True, True, False, False, False]
    six = _edges([(f"L0.mlp.neuron{j}", "L1.attn.head0", 0.1 + j / 100, "exact", "neuron") for j in range(6)])
    sources = hierarchy(six, space, anchor_layer=2).query("level_name == 'source'")["component"]
    assert sorted(sources) == [f"L0.mlp.neuron{j}" for j in range(1, 6)]  # k = 5 by default


@pytest.mark.parametrize("positions", ["last", "all"])
def test_first_order_supply_is_the_exact_supply_to_first_order(tmp_path, positions):
    """On a float64 pair whose fine-tune is tiny, supply is linear in the delta: the gradient-based
    estimate and the exact patch agree to O(delta), over several left-padded batches. Measured largest
    difference / largest supply: 1.1e-2 at delta 1e-3, 1.1e-3 at 1e-4, then it grows again as delta
    shrinks (1.3e-3 at 1e-5, 1.1e-2 at 1e-6), as round-off does: transformers' LlamaRMSNorm normalizes
    in float32 even in a float64 model, a floor under the exact differences. 1e-4 is the sweet spot."""
    pair = load_pair(*make_pair("llama", tmp_path, scale=1e-4), dtype="float64")
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(5, 5), batch_size=2)
    targets = ["L2.attn.head1", "L1.mlp"]
    few = ["L0.attn.head0", "L0.attn.head3", "L1.attn.head2", "L0.mlp.neuron4", "L1.mlp.neuron9"]
    exact = trace_suppliers(scorer, targets, candidates=few, method="exact", positions=positions)
    first = trace_suppliers(scorer, targets, candidates=few, method="first_order", positions=positions)
    key = ["target", "supplier"]
    joined = exact.merge(first, on=key, suffixes=("_exact", "_first"))
    assert len(joined) == len(exact) == len(first) and len(exact) > 5
    assert (joined["n_prompts_exact"] == joined["n_prompts_first"]).all()
    assert set(first["method"]) == {"first_order"} and set(exact["method"]) == {"exact"}
    scale = joined["supply_exact"].abs().max()
    assert scale > 0
    np.testing.assert_allclose(joined["supply_first"], joined["supply_exact"], rtol=1e-2, atol=3e-3 * scale)
    default = trace_suppliers(scorer, targets, candidates=few, method="exact")
    pd.testing.assert_frame_equal(default, trace_suppliers(scorer, targets, candidates=few, positions="last"))
    # verification: each target's best first-order supplier is replaced by its exact row, the rest kept
    verified = trace_suppliers(scorer, targets, candidates=few, method="first_order", verify_top=1, positions=positions)
    assert len(verified) == len(first)
    for target in targets:
        mine = verified[verified["target"] == target].set_index("supplier")
        best = first[first["target"] == target].sort_values("supply", ascending=False)["supplier"].iloc[0]
        assert mine.loc[best, "method"] == "exact" and (mine.drop(index=best)["method"] == "first_order").all()
        want = exact.set_index(key).loc[(target, best), "supply"]
        assert mine.loc[best, "supply"] == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match=r"^no targets to trace$"):
        trace_suppliers(scorer, [], candidates=few)


def test_upstream_rule_within_a_layer_and_for_whole_blocks(llama_pair_dirs):
    space = load_pair(*llama_pair_dirs).space
    assert is_upstream(space, "L1.attn.head0", "L1.mlp") and is_upstream(space, "L1.attn", "L1.mlp.neuron3")
    assert not is_upstream(space, "L1", "L1.mlp")  # the whole block writes after its own MLP reads
    assert not is_upstream(space, "L0.mlp.neuron1", "L0.attn.head0")  # the MLP runs after attention
    assert not is_upstream(space, "L1.mlp", "L1.attn") and not is_upstream(space, "L1.mlp", "L1.mlp")
    assert is_upstream(space, "L0.mlp.neuron1", "L1.attn.head0")
    assert is_upstream(space, "embed", "L0.attn.head0")  # model-level weights read before block 0


def test_edges_record_both_layers(planted):
    edges = trace_suppliers(planted, [PLANTED_HEAD, "L2.mlp"], method="first_order")
    space = planted.pair.space
    # tolist: an all-<NA> column would pass an element-wise == (NA is skipped by .all())
    assert edges["target_layer"].tolist() == [space.parse(t).layer for t in edges["target"]]
    assert edges["supplier_layer"].tolist() == [space.parse(s).layer for s in edges["supplier"]]


def _llama_outputs_by_hand(model, batches, target: str, positions: str) -> torch.Tensor:
    """A target's output read with a hook on the module path written out for the tiny Llama (heads:
    their 8 channels of ``o_proj``'s input; ``L2.mlp``: the MLP's output), at the last position or at
    every real one (padding zeroed), over a full forward of the whole model."""
    layer = int(target[1])
    head = int(target.rsplit("head", 1)[1]) if ".head" in target else None
    module = model.get_submodule(f"model.layers.{layer}." + ("self_attn.o_proj" if head is not None else "mlp"))
    parts = []
    for b in batches:
        seen = []
        if head is not None:
            handle = module.register_forward_pre_hook(
                lambda _m, args, seen=seen: seen.append(args[0][..., 8 * head : 8 * head + 8])
            )
        else:
            handle = module.register_forward_hook(lambda _m, _args, out, seen=seen: seen.append(out))
        with torch.no_grad():
            model(**b.kwargs(), use_cache=False)
        handle.remove()
        x = seen[0].double()
        parts.append(x[:, -1] if positions == "last" else (x * b.attention_mask[..., None]).flatten(1))
    return torch.cat(parts)


def _supply_by_hand(pair, batches, target, supplier, positions, min_relative_gap) -> tuple[float, int]:
    receiver = _llama_outputs_by_hand(pair.model, batches, target, positions)
    with pair.as_model("specialized" if pair.receiver == "base" else "base") as donor_model:
        donor = _llama_outputs_by_hand(donor_model, batches, target, positions)
    with patched(pair.model, pair.donor, pair.space, [supplier]):
        moved = _llama_outputs_by_hand(pair.model, batches, target, positions)
    d = donor - receiver
    norm2 = (d**2).sum(-1)
    keep = norm2 > min_relative_gap * norm2.median()
    ratios = ((moved - receiver) * d).sum(-1) / norm2
    return float(ratios[keep].mean()), int(keep.sum())


@pytest.mark.parametrize("receiver", ["base", "specialized"])
def test_exact_supply_by_hand(llama_pair_dirs, receiver):
    """Exact supply edges against the projection ratio computed from full forwards with hand-written
    hooks: at the defaults (last position, min_relative_gap 0.1) and at positions="all" with another
    floor; in repair and in knockout (receiver = specialized) runs; targets above the anchor layer;
    a first candidate upstream of no target; the table's order and dtypes."""
    pair = load_pair(*llama_pair_dirs, receiver=receiver)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=1, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(7, 5), batch_size=3)
    targets = ["L2.attn.head1", "L2.mlp"]
    candidates = ["L2.mlp.neuron0", "L0.attn.head0", "embed", "L1.mlp.neuron3", "L2.attn.head2"]
    expected = {(t, s) for t in targets for s in candidates[1:4]} | {("L2.mlp", "L2.attn.head2")}
    default = trace_suppliers(scorer, targets, candidates=candidates)
    wide = trace_suppliers(scorer, targets, candidates=candidates, positions="all", min_relative_gap=0.9)
    for edges, positions, gap in ((default, "last", 0.1), (wide, "all", 0.9)):
        got = edges.set_index(["target", "supplier"])
        assert set(got.index) == expected
        for t, s in expected:
            value, n = _supply_by_hand(pair, scorer.batches, t, s, positions, gap)
            assert got.loc[(t, s), "supply"] == pytest.approx(value, rel=1e-5, abs=1e-9), (t, s, positions)
            assert got.loc[(t, s), "n_prompts"] == n
    assert not default.equals(wide)
    assert list(default["target"]) == sorted(default["target"])  # by target, then supply descending
    for _, group in default.groupby("target"):
        assert list(group["supply"]) == sorted(group["supply"], reverse=True)
    assert str(default["supplier_layer"].dtype) == str(default["target_layer"].dtype) == "Int64"
    assert default[default["supplier"] == "embed"]["supplier_layer"].isna().all()
    with pytest.raises(ValueError, match=r"^unknown tracing method 'bogus'; use 'exact' or 'first_order'$"):
        trace_suppliers(scorer, targets, candidates=candidates, method="bogus")


def test_a_target_the_fine_tune_leaves_alone_has_no_supply(planted):
    """Only the planted neurons differ, so a head below them has the same output in both models:
    no prompt is kept, the supply is NaN over 0 prompts (not an error, not a division by zero)."""
    edges = trace_suppliers(planted, ["L0.attn.head0"], candidates=["embed"])
    assert edges["supply"].isna().all() and (edges["n_prompts"] == 0).all() and len(edges) == 1


def test_first_order_supply_with_a_single_prompt(tmp_path):
    """One kept prompt: the first-order weights divide by 1 (not by a clamped larger count)."""
    pair = load_pair(*make_pair("llama", tmp_path, scale=1e-4), dtype="float64")
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(1, 5))
    few = ["L0.attn.head0", "L1.attn.head2", "L0.mlp.neuron4"]
    exact = trace_suppliers(scorer, ["L2.attn.head1"], candidates=few).set_index("supplier")
    first = trace_suppliers(scorer, ["L2.attn.head1"], candidates=few, method="first_order").set_index("supplier")
    assert (exact["n_prompts"] == 1).all() and (first["n_prompts"] == 1).all()
    scale = exact["supply"].abs().max()
    np.testing.assert_allclose(first.loc[exact.index, "supply"], exact["supply"], rtol=1e-2, atol=3e-3 * scale)


def test_tracer_defaults_embedding_targets_and_empty_tables(llama_pair_dirs):
    """SupplyTracer's own defaults are trace_suppliers' (last position, min_relative_gap 0.1); the
    embedding as a target has no supplier (nothing is upstream of the model's input); candidates
    upstream of no target give an empty table with every column, for both methods."""
    from weightpatch.tracing import EDGE_COLUMNS, SupplyTracer

    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(7, 5), batch_size=3)
    direct = SupplyTracer(scorer, ["L2.mlp"]).exact(["L0.attn.head0"])
    value, n = _supply_by_hand(pair, scorer.batches, "L2.mlp", "L0.attn.head0", "last", 0.1)
    assert direct["supply"].item() == pytest.approx(value, rel=1e-5) and direct["n_prompts"].item() == n
    assert direct["target_layer"].tolist() == [2] and direct["supplier_layer"].tolist() == [0]
    space = pair.space
    assert not is_upstream(space, "L0.attn.head0", "embed") and not is_upstream(space, "L1", "embed")
    assert not is_upstream(space, "L1.mlp.down", "L1.mlp.neuron3")  # read after the neuron's activation
    assert len(trace_suppliers(scorer, ["embed"], kinds=("head", "neuron", "module"))) == 0
    for method in ("exact", "first_order"):
        empty = trace_suppliers(scorer, ["L0.attn.head0"], candidates=["L2.mlp.neuron0"], method=method)
        assert empty.columns.tolist() == EDGE_COLUMNS and len(empty) == 0


def test_supplier_overlap_says_when_a_side_has_fewer_than_k(llama_pair_dirs, caplog):
    """supplier_overlap(k=10) against 8 verified neurons compared 10 with 8 without a word."""
    from weightpatch.results import ScoreTable, score_row
    from weightpatch.tracing import supplier_overlap

    space = load_pair(*llama_pair_dirs).space
    neurons = [f"L0.mlp.neuron{i}" for i in range(12)]
    edges = _edges([(n, "T1", 0.01 * (12 - i), "exact", "neuron") for i, n in enumerate(neurons)])
    table = ScoreTable.from_rows(score_row(space.parse(n), "exact", 1.0, 0.0, 1) for n in neurons[:8])
    with caplog.at_level("WARNING", logger="weightpatch"):
        out = supplier_overlap(edges, table, k=10)
    assert len(out["weight_patching"]) == 8
    assert "compares 10 traced suppliers with 8 Weight Patching neuron scores (exact)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="weightpatch"):
        supplier_overlap(edges, table, k=8)
    assert caplog.text == ""
