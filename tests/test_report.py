"""The HTML report from synthetic result tables: valid HTML, every embedded image decodes, optional
sections appear exactly when their files exist."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from weightpatch.components import Component
from weightpatch.errors import WeightPatchError
from weightpatch.report import build_report, embedded_images
from weightpatch.results import ScoreTable, score_row
from weightpatch.rundir import RunDir

MODELS = {
    "base": {"source": "b", "weights_sha256": "a" * 64},
    "specialized": {"source": "s", "weights_sha256": "b" * 64},
}
VOID = {"meta", "img", "br", "hr", "input", "link"}


class Checker(HTMLParser):
    """Tag balance checker: every non-void tag closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def _scores(rng, methods=("first_order", "exact", "activation")) -> ScoreTable:
    rows = []
    for layer in range(3):
        for h in range(4):
            for m in methods:
                rows.append(score_row(Component("head", layer, "attn", h), m, rng.normal(0, 0.1), 0.01, 8))
        for j in range(20):
            rows.append(score_row(Component("neuron", layer, "mlp", j), "first_order", rng.normal(0, 0.02), 0.0, 8))
        rows.append(score_row(Component("module", layer, "mlp"), "first_order", rng.normal(0, 0.3), 0.0, 8))
    return ScoreTable.from_rows(rows)


def _minimal_run(path: Path) -> RunDir:
    return RunDir.open(path, "screen", {"top_k": 3}, MODELS)


def _full_run(path: Path) -> Path:
    rng = np.random.default_rng(0)
    run = _minimal_run(path)
    (path / "anchor.json").write_text(
        json.dumps({"layer": 2, "method": "instruction", "metrics": {"auc": 0.98, "cohen_d": 3.1}})
    )
    run.save_table("anchor_layers", pd.DataFrame({"layer": [0, 2], "cohen_d": [1.0, 3.1], "auc": [0.8, 0.98]}))
    run.save_table(
        "steering",
        pd.DataFrame({"alpha": [0, 1, 2], "metric": [0.1, 0.4, 0.7], "metric_name": ["accuracy"] * 3}),
    )
    scores = _scores(rng)
    run.save_table("scores", scores.frame)
    run.save_table("verified", scores.side_by_side().head(8))
    run.save_table(
        "weight_delta",
        pd.DataFrame(
            {"layer": [0, 0, 1, 1], "group": ["attn", "mlp"] * 2, "relative_change": [1e-3, 2e-3, 3e-3, 1e-3]}
        ),
    )
    curve = pd.DataFrame(
        [
            {"k": k, "selection": sel, "recovery": k / 5 if sel == "top" else rng.uniform(0, 0.2)}
            for k in (1, 2, 5)
            for sel in ("top", "random", "random")
        ]
    )
    run.save_table("sufficiency", curve)
    run.save_table("necessity", curve)
    run.save_table(
        "supplier_edges",
        pd.DataFrame(
            {
                "supplier": ["L0.mlp.neuron3", "L0.mlp.neuron7", "L1.attn.head0"],
                "target": ["L2.attn.head1", "L2.attn.head1", "L2.attn.head3"],
                "score": [0.4, -0.1, 0.2],
            }
        ),
    )
    run.save_table("roles", pd.DataFrame({"component": ["L0.mlp.neuron3"], "role": ["source"]}))
    run.save_table("merge_table", pd.DataFrame({"method": ["ties"], "mechanism": ["none"], "ifeval": [0.5]}))
    run.close()
    return path


def _check_html(text: str) -> Checker:
    parser = Checker()
    parser.feed(text)
    parser.close()
    assert not parser.errors, parser.errors[:3]
    assert parser.stack == [], parser.stack
    return parser


def _decode(png: bytes) -> tuple[int, int]:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    try:
        from PIL import Image

        with Image.open(io.BytesIO(png)) as im:
            im.load()
            return im.size
    except ImportError:
        import matplotlib.image

        arr = matplotlib.image.imread(io.BytesIO(png), format="png")
        return arr.shape[1], arr.shape[0]


def test_full_report_is_valid_html_with_decodable_images(tmp_path):
    run = _full_run(tmp_path / "run")
    path = build_report(run)
    text = path.read_text()
    parser = _check_html(text)
    images = embedded_images(text)
    assert len(images) == len(parser.images) >= 8
    for png in images:
        w, h = _decode(png)
        assert w > 100 and h > 100
    for title in (
        "Anchor",
        "Attention heads",
        "MLP neurons",
        "Top components",
        "Validation",
        "Hierarchy",
        "Merges",
        "Weight change",
    ):
        assert f"<h2>{title}" in text, title
    assert "fraction of anchor gap recovered" in text
    assert "http://" not in text and "https://" not in text  # self-contained


def test_optional_sections_are_skipped(tmp_path):
    run = _minimal_run(tmp_path / "run")
    run.save_table("scores", _scores(np.random.default_rng(1), methods=("first_order",)).frame)
    run.close()
    text = build_report(tmp_path / "run", tmp_path / "out" / "r.html").read_text()
    _check_html(text)
    assert "<h2>Attention heads" in text and "No activation-space scores" in text
    for title in ("Anchor", "Validation", "Hierarchy", "Merges"):
        assert f"<h2>{title}" not in text
    for png in embedded_images(text):
        _decode(png)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(WeightPatchError, match="not a weightpatch run directory"):
        build_report(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs /usr/bin/chromium")
def test_renders_in_headless_chromium(tmp_path):
    path = build_report(_full_run(tmp_path / "run"))
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "/usr/bin/chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,3000",
            path.resolve().as_uri(),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    assert shot.is_file() and shot.stat().st_size > 10_000
    shutil.rmtree(tmp_path / "run")


def test_truncated_table_and_pending_scores(tmp_path):
    run = _minimal_run(tmp_path / "run")
    scores = _scores(np.random.default_rng(1), methods=("first_order",))
    run.append_scores(scores)  # still pending (the writer has not closed): the report reads them too
    text = build_report(tmp_path / "run", tmp_path / "out" / "r.html").read_text()
    assert "<h2>Attention heads" in text
    run.close()
    data = (tmp_path / "run" / "scores.parquet").read_bytes()
    (tmp_path / "run" / "scores.parquet").write_bytes(data[:100])
    with pytest.raises(WeightPatchError, match=r"scores.parquet is truncated or corrupt"):
        build_report(tmp_path / "run")
