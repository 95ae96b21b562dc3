"""Result tables for analysis: column types, nulls for "none", the component-class vocabulary, list
columns, provenance in the Parquet metadata, legacy -1 read as null; and ``load_run``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import tiny_texts
from weightpatch.anchors import build_anchor
from weightpatch.components import COMPONENT_CLASSES, Component
from weightpatch.errors import WeightPatchError
from weightpatch.pair import load_pair
from weightpatch.results import (
    DTYPES,
    PROVENANCE_FIELDS,
    PROVENANCE_KEY,
    ScoreTable,
    config_sha256,
    provenance,
    read_provenance,
    read_table,
    score_row,
    write_atomic,
)
from weightpatch.rundir import RunDir
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen
from weightpatch.screening.first_order import gradient_scores
from weightpatch.validation import sufficiency_curve


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("L2", "block"),
        ("L2.attn", "attention"),
        ("L2.mlp", "mlp"),
        ("L2.attn.q", "projection"),
        ("L2.mlp.down", "projection"),
        ("L2.norm.pre_attn", "norm"),
        ("L2.attn.q_norm", "norm"),
        ("norm.final", "norm"),
        ("embed", "embedding"),
        ("pos_embed", "embedding"),
        ("unembed", "unembedding"),
        ("L2.attn.head3", "head"),
        ("L2.mlp.neuron7", "neuron"),
    ],
)
def test_component_class(name, expected):
    assert Component.parse(name).component_class == expected
    assert expected in COMPONENT_CLASSES


@pytest.fixture(scope="module")
def demo_like(llama_pair_dirs, tmp_path_factory):
    """A run directory with first-order and exact scores of every kind (model-level modules
    included), a sufficiency curve and provenance-stamped Parquet files."""
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 3), batch_size=4)
    first = gradient_scores(scorer, progress=False)
    exact = ExactScreen(scorer).run(["embed", "unembed", "norm.final", "L0.attn.head1", "L1.mlp", "L0"], progress=False)
    table = ScoreTable.concat([first, exact])
    curve = sufficiency_curve(scorer, first, ks=[1, 2], method="first_order", kind="head", controls=5)
    root = tmp_path_factory.mktemp("run")
    run = RunDir.open(root, "screen", {"top_k": 3}, pair.identities())
    anchor.save(run.anchor_stem)
    stamp = provenance(pair.identities(), {"top_k": 3}, anchor_sha256="f" * 64)
    for name, frame in (("scores", table.frame), ("verified", table.side_by_side()), ("sufficiency", curve)):
        write_atomic(frame, root / f"{name}.parquet", stamp)
        write_atomic(frame, root / f"{name}.csv")
    run.close()
    return root, pair, stamp


def test_score_table_schema_nulls_and_classes(demo_like):
    root, pair, _ = demo_like
    frame = pd.read_parquet(root / "scores.parquet")
    assert list(frame.columns) == list(DTYPES)
    assert {c: str(t) for c, t in frame.dtypes.items()} == DTYPES
    model_level = frame[frame["component"].isin(["embed", "unembed", "norm.final"])]
    assert len(model_level) == 6  # first order + exact
    assert model_level["layer"].isna().all() and model_level["index"].isna().all()
    assert not (frame["layer"] == -1).any() and not (frame["index"] == -1).any()
    modules = frame[(frame["kind"] == "module") & frame["layer"].notna()]
    assert modules["index"].isna().all()
    heads = frame[frame["kind"] == "head"]
    assert heads["index"].notna().all() and set(heads["component_class"]) == {"head"}
    classes = dict(zip(frame["component"], frame["component_class"], strict=False))
    assert classes["L0"] == "block" and classes["L0.attn.q"] == "projection" and classes["embed"] == "embedding"
    assert set(frame["component_class"]) <= set(COMPONENT_CLASSES)
    # first-order rows now carry a standard error across prompts
    first = frame[frame["method"] == "first_order"]
    assert first["stderr"].notna().all() and (first.loc[first["score"] != 0, "stderr"] > 0).all()
    assert len(first) == len(list(pair.space.components()))
    # the CSV twin reads back with the same nulls
    csv = read_table(root / "scores.csv")
    assert csv["layer"].isna().sum() == frame["layer"].isna().sum()


def test_side_by_side_keeps_model_level_rows_and_stderr(demo_like):
    root, _, _ = demo_like
    wide = pd.read_parquet(root / "verified.parquet").set_index("component")
    assert {"exact", "first_order", "exact_stderr", "first_order_stderr"} <= set(wide.columns)
    assert pd.isna(wide.loc["embed", "layer"]) and wide.loc["embed", "component_class"] == "embedding"
    assert wide.loc["unembed", "exact"] == 0.0  # acts after the anchor layer: exactly zero
    assert wide.loc["L0.attn.head1", "exact_stderr"] > 0
    assert pd.isna(wide.loc["L0.attn.head0", "exact"])  # not verified


def test_list_columns_are_lists(demo_like):
    root, _, _ = demo_like
    curve = pd.read_parquet(root / "sufficiency.parquet")
    assert [len(c) for c in curve["components"]] == [1, 2]
    assert all(isinstance(c, str) for c in curve["components"].iloc[1])
    assert curve["n_controls"].tolist() == [5, 5]


def test_provenance_in_every_parquet_file(demo_like):
    root, pair, stamp = demo_like
    ids = pair.identities()
    for name in ("scores", "verified", "sufficiency"):
        got = read_provenance(root / f"{name}.parquet")
        assert set(got) == set(PROVENANCE_FIELDS)
        assert got["base_sha256"] == ids["base"]["weights_sha256"]
        assert got["specialized_sha256"] == ids["specialized"]["weights_sha256"]
        assert got["anchor_sha256"] == "f" * 64 and got["config_sha256"] == config_sha256({"top_k": 3})
        assert got["weightpatch_version"] == __import__("weightpatch").__version__
        # pandas' own metadata survives beside ours: nullable dtypes round-trip
        assert b"pandas" in pq.read_schema(root / f"{name}.parquet").metadata
    assert json.loads(pq.read_schema(root / "scores.parquet").metadata[PROVENANCE_KEY]) == stamp
    assert config_sha256({"a": 1, "b": [1, 2]}) == config_sha256({"b": [1, 2], "a": 1})
    assert config_sha256({"a": 1}) != config_sha256({"a": 2})


def test_legacy_minus_one_reads_as_null(tmp_path):
    legacy = pd.DataFrame(
        {
            "component": ["embed", "L0.attn.head1", "L1.mlp"],
            "kind": ["module", "head", "module"],
            "layer": [-1, 0, 1],
            "index": [-1, 1, -1],
            "method": ["exact"] * 3,
            "score": [0.1, 0.2, 0.3],
            "stderr": [0.0] * 3,
            "n_prompts": [4] * 3,
        }
    )
    legacy.to_parquet(tmp_path / "scores.parquet", index=False)
    assert read_provenance(tmp_path / "scores.parquet") is None
    table = ScoreTable.load(tmp_path / "scores.parquet").frame
    assert table["layer"].isna().tolist() == [True, False, False]
    assert table["index"].isna().tolist() == [True, False, True]
    assert table["component_class"].tolist() == ["embedding", "head", "mlp"]
    row = score_row(Component.parse("norm.final"), "exact", 0.0, np.nan, 2)
    assert row["layer"] is None and row["index"] is None and row["component_class"] == "norm"


def test_load_run(demo_like):
    import weightpatch

    root, pair, _ = demo_like
    run = weightpatch.load_run(root)
    assert run.config == {"screen": {"top_k": 3}}
    assert run.anchor.layer == 2 and run.anchor.vector.shape == (pair.space.dims.hidden_size,)
    assert set(run.tables) >= {"scores", "verified", "sufficiency"}
    pd.testing.assert_frame_equal(run.tables["scores"], pd.read_parquet(root / "scores.parquet"))
    assert len(run.scores.select("exact")) == 6
    assert run.provenance("scores")["anchor_sha256"] == "f" * 64
    page = run._repr_html_()
    assert str(root) in page and "layer 2" in page and "<code>scores</code>" in page
    assert ids_short(pair) in page
    assert "Run(" in repr(run)
    with pytest.raises(WeightPatchError, match="not a weightpatch run directory"):
        weightpatch.load_run(root / "nowhere")


def ids_short(pair) -> str:
    return pair.identities()["base"]["weights_sha256"][:16]


def _table(rows: list[tuple[str, str, float]]) -> ScoreTable:
    return ScoreTable.from_rows(score_row(Component.parse(c), m, s, 0.0, 4) for c, m, s in rows)


def test_save_and_load_take_the_same_stem(tmp_path):
    table = _table([("L0.mlp", "exact", 0.5), ("L1.attn.head2", "exact", -0.25)])
    table.save(tmp_path / "runs" / "scores3")
    for given in ("runs/scores3", "runs/scores3.parquet", "runs/scores3.csv"):
        assert ScoreTable.load(tmp_path / given).frame.equals(table.frame), given
    with pytest.raises(WeightPatchError, match=r"no score table at .*scores4\.parquet"):
        ScoreTable.load(tmp_path / "runs" / "scores4")


def test_top_ranks_by_magnitude_and_refuses_mixed_methods():
    exact = [("L0.mlp", "exact", 0.2), ("L3.mlp.neuron302", "exact", -0.5), ("L1.mlp", "exact", 0.1)]
    table = _table([*exact, ("L0.mlp", "first_order", 0.9)])
    assert table.top(2, method="exact").components() == ["L3.mlp.neuron302", "L0.mlp"]  # |-0.5| first
    assert table.top(2, method="exact", by_abs=False).components() == ["L0.mlp", "L1.mlp"]
    with pytest.raises(WeightPatchError, match=r"2 methods \(exact, first_order\); pass method="):
        table.top(2)
    assert table.select("first_order").top(1).components() == ["L0.mlp"]  # one method: no need to name it


def test_head_matrix_has_a_nan_row_for_a_layer_without_heads():
    table = _table([("L0.attn.head1", "exact", 0.5), ("L2.attn.head0", "exact", 0.25), ("L1.mlp", "exact", 0.1)])
    matrix = table.matrix("exact", "head")
    assert matrix.index.tolist() == [0, 1, 2] and matrix.columns.tolist() == [0, 1]
    assert matrix.loc[1].isna().all() and matrix.loc[0, 1] == 0.5 and np.isnan(matrix.loc[0, 0])
    assert table.matrix("exact", "head", num_layers=4).index.tolist() == [0, 1, 2, 3]


def test_notebook_displays_are_short_and_informative(demo_like):
    """ModelPair printed its whole model and tokenizer, Anchor 128 floats, AnchorScorer an address."""
    root, pair, _ = demo_like
    run = RunDir(root)
    table = run.scores()
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 3), batch_size=4)
    for text, html in [(repr(obj), obj._repr_html_()) for obj in (table, anchor, scorer, pair)]:
        assert len(text) < 400 and "\n" not in text and " at 0x" not in text, text
        assert html.startswith('<div class="weightpatch">') and len(html) < 6000
    assert f"rows {len(table)}" in repr(table) and "exact (6)" in repr(table)
    assert "layer 2" in repr(anchor) and "dimension" in repr(anchor) and "tensor(" not in repr(anchor)
    assert "prompts 6" in repr(scorer) and "anchor layer 2" in repr(scorer)
    assert "family llama" in repr(pair) and "dtype float32" in repr(pair) and "LlamaForCausalLM" not in repr(pair)
    html = table._repr_html_()
    assert "top 10 by |first_order|" in html and html.count("</tr>") == 11  # header and ten rows


def test_heatmap_is_the_reports_figure_with_a_row_per_layer():
    import matplotlib.pyplot as plt

    table = _table([("L0.attn.head1", "exact", 0.5), ("L2.attn.head0", "exact", -0.25), ("L1.mlp", "exact", 0.1)])
    fig = table.heatmap("exact")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]  # layer 1: a grey row, not left out
    assert ax.get_title() == "weight space, exact"
    assert [t.get_text() for t in ax.texts] == ["0.500\n±0.000", "-0.250\n±0.000"]  # score ± stderr
    plt.close(fig)


def test_plot_is_the_reports_per_layer_figure_of_one_method_and_kind():
    """``ScoreTable.plot()`` (issue 30: score tables had ``heatmap()`` only): the report's per-layer
    figure (box plot per layer, sum of |score| per layer) of one method's scores of one kind."""
    import matplotlib.pyplot as plt

    neurons = [("L0.mlp.neuron1", "exact", 0.5), ("L0.mlp.neuron2", "exact", -0.25), ("L2.mlp.neuron0", "exact", 0.1)]
    table = _table([*neurons, ("L1.mlp", "exact", 0.9), ("L0.mlp.neuron1", "first_order", 0.4)])
    with pytest.raises(WeightPatchError, match=r"2 methods \(exact, first_order\); pass method="):
        table.plot()
    fig = table.plot("exact")
    box, bars = fig.axes
    assert box.get_title() == "neuron scores per layer (exact)" and bars.get_title() == "total neuron effect per layer"
    assert [t.get_text() for t in bars.get_xticklabels()] == ["0", "2"]  # layers with neuron scores
    assert [p.get_height() for p in bars.patches] == pytest.approx([0.75, 0.1])  # sum of |score| per layer
    assert table.select("exact").plot(kind="module").axes[1].patches[0].get_height() == pytest.approx(0.9)
    plt.close("all")
