from conftest import tiny_texts
from weightpatch.anchors import build_anchor
from weightpatch.pair import load_pair
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.verify import screen_then_verify


def test_screen_then_verify_verifies_the_top_of_each_kind(llama_pair_dirs, tmp_path):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    scorer = AnchorScorer(pair, anchor, tiny_texts(6, 3))
    table, wide = screen_then_verify(scorer, kinds=("head", "module"), top_k=3, progress=False)
    assert set(table.frame["method"]) == {"first_order", "exact"}
    assert len(wide) == 6 and {"first_order", "exact"} <= set(wide.columns)
    first = table.select("first_order", "head").frame
    top3 = first.loc[first["score"].abs().sort_values(ascending=False).index[:3], "component"]
    assert set(top3) <= set(wide["component"])
    parquet, csv = table.save(tmp_path / "scores")
    from weightpatch.results import ScoreTable

    assert ScoreTable.load(parquet).frame.equals(table.frame)
    assert len(ScoreTable.load(csv)) == len(table)
