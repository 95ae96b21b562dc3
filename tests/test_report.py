"""The HTML report from synthetic result tables: valid HTML, every embedded image decodes, optional
sections appear exactly when their files exist."""

from __future__ import annotations

import html
import io
import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from weightpatch.anchors import Anchor
from weightpatch.components import Component
from weightpatch.errors import WeightPatchError
from weightpatch.report import build_report, embedded_images, fmt, with_error
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
                if m != "exact" or h % 2 == 0:  # exact: verified heads only
                    stderr = rng.uniform(0.005, 0.02)
                    rows.append(score_row(Component("head", layer, "attn", h), m, rng.normal(0, 0.1), stderr, 8))
        for j in range(20):
            rows.append(score_row(Component("neuron", layer, "mlp", j), "first_order", rng.normal(0, 0.02), 0.0, 8))
        rows.append(score_row(Component("module", layer, "mlp"), "first_order", rng.normal(0, 0.3), 0.0, 8))
    return ScoreTable.from_rows(rows)


def _minimal_run(path: Path) -> RunDir:
    return RunDir.open(path, "screen", {"top_k": 3}, MODELS)


def _curve(rng, column: str) -> pd.DataFrame:
    """A validation curve as :mod:`weightpatch.validation` writes it (wide form, list components)."""
    rows = []
    for ranking, pool in (("heads", 12), ("neurons", 60)):
        for k in (1, 2, 4, pool):
            controls = 5 if k < pool else 0
            rows.append(
                {
                    "k": k,
                    column: min(1.0, k / 5),
                    "random_mean": rng.uniform(0, 0.2) if controls else np.nan,
                    "random_std": rng.uniform(0.01, 0.05) if controls else np.nan,
                    "n_controls": controls,
                    "components": [f"L0.attn.head{i % 4}" for i in range(k)],
                    "ranking": ranking,
                }
            )
    return pd.DataFrame(rows)


def _full_run(path: Path) -> Path:
    rng = np.random.default_rng(0)
    run = _minimal_run(path)
    vector = torch.nn.functional.normalize(torch.randn(8, generator=torch.Generator().manual_seed(0)), dim=0)
    Anchor(vector, 2, "instruction", MODELS, "0" * 64, {"auc": 0.98, "cohen_d": 3.1}).save(run.anchor_stem)
    run.update_record(screening={"n_prompts": 24, "n_excluded": 2, "anchor_layer": 2})
    layers = {
        "layer": [0, 2],
        "cohen_d": [1.0, 3.1],
        "auc": [0.8, 0.98],
        "accuracy": [0.7, 0.95],
        "mean_gap": [0.4, 1.2],
    }
    run.save_table("anchor_layers", pd.DataFrame(layers))
    steering = pd.DataFrame(
        {
            "alpha": [np.nan, 0, 1, 2, 1, 2, 1, 2, np.nan],
            "metric": [0.1, 0.1, 0.4, 0.7, 0.12, 0.15, 0.09, 0.11, 0.8],
            "direction": ["base", "anchor", "anchor", "anchor", "random", "random", "random", "random", "specialized"],
            "draw": [0, 0, 0, 0, 0, 0, 1, 1, 0],
        }
    ).assign(metric_name="accuracy", scale=2.5, n_prompts=12)
    run.save_table("steering", steering)
    scores = _scores(rng)
    run.save_table("scores", scores.frame)
    run.save_table("verified", scores.side_by_side().dropna(subset=["exact"]).head(8))
    run.save_table(
        "weight_delta",
        pd.DataFrame(
            {"layer": [0, 0, 1, 1], "group": ["attn", "mlp"] * 2, "relative_change": [1e-3, 2e-3, 3e-3, 1e-3]}
        ).assign(delta_norm=0.01, base_norm=5.0, parameters=4096),
    )
    run.save_table("sufficiency", _curve(rng, "recovery"))
    run.save_table("necessity", _curve(rng, "drop"))
    run.save_table(
        "supplier_edges",
        pd.DataFrame(
            {
                "target": ["L2.attn.head1", "L2.attn.head1", "L2.attn.head3"],
                "supplier": ["L0.mlp.neuron3", "L0.mlp.neuron7", "L1.attn.head0"],
                "supplier_kind": ["neuron", "neuron", "head"],
                "supplier_layer": [0, 0, 1],
                "target_layer": [2, 2, 2],
                "supply": [0.4, -0.1, 0.2],
                "n_prompts": [8, 8, 8],
                "method": ["exact", "first_order", "exact"],
            }
        ),
    )
    by_method = scores.frame.set_index(["method", "component"])["score"]
    names = ["L0.attn.head0", "L2.attn.head2", "L1.attn.head0"]
    roles = pd.DataFrame(
        {
            "component": names,
            "kind": ["head"] * 3,
            "layer": [0, 2, 1],
            "index": [0, 2, 0],
            "activation": [by_method["activation", n] for n in names],
            "weight": [by_method["exact", n] for n in names],  # roles from exact scores
            "activation_high": [False, True, False],
            "weight_high": [True, False, False],
            "role": pd.Categorical(["source", "router", "neither"], categories=["source", "router", "both", "neither"]),
            "weight_method": "exact",
        }
    )
    run.save_table("roles", roles)
    run.save_table(
        "hierarchy",
        pd.DataFrame(
            {
                "component": ["L0.mlp.neuron3", "L2.attn.head1", "unembed"],
                "level": [0, 1, 3],
                "level_name": ["source", "router", "unembedding"],
                "layer": pd.array([0, 2, None], dtype="Int64"),
                "traced": [True, True, False],
            }
        ),
    )
    merges = {"output": ["out/ties"], "method": ["ties"], "mechanism": ["none"], "experts": ["a, b"], "ifeval": [0.5]}
    run.save_table("merge_table", pd.DataFrame(merges))
    run.close()
    return path


def _section_text(page: str, topic: str) -> str:
    match = re.search(rf'<dd data-topic="{re.escape(topic)}">(.*?)</dd>', page, re.S)
    assert match, f"no finding {topic!r}"
    return html.unescape(match[1])


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


def test_findings_numbers_equal_the_tables(tmp_path):
    """Every number in the summary is computed from the run's tables (changing a table changes it)."""
    from scipy import stats

    run = _full_run(tmp_path / "run")
    page = build_report(run).read_text()
    anchor = _section_text(page, "Anchor")
    assert "layer 2" in anchor and "Cohen's d 3.10" in anchor and "AUC 0.980" in anchor
    steering = pd.read_parquet(run / "steering.parquet")
    rand = steering[(steering["direction"] == "random") & (steering["alpha"] == 2)]["metric"]
    assert "moves accuracy from 0.10 (alpha 0.00) to 0.70 (alpha 2.00)" in anchor
    assert (
        f"random directions {rand.mean():.2f} ± {rand.std():.2f}" in anchor
        and "specialized model scores 0.80" in anchor
    )

    scores = pd.read_parquet(run / "scores.parquet")
    verified = set(pd.read_parquet(run / "verified.parquet")["component"])
    exact = scores[(scores["method"] == "exact") & scores["component"].isin(verified)]
    best = exact.loc[exact["score"].abs().idxmax()]
    assert f"{best['component']} {with_error(best['score'], best['stderr'])}" in _section_text(page, "Top components")

    suff = pd.read_parquet(run / "sufficiency.parquet")
    text = _section_text(page, "Top-k patched into the base")
    for ranking, sub in suff.groupby("ranking"):
        row = sub[sub["n_controls"] > 0].sort_values("k").iloc[-1]
        k = int(row["k"])
        expected = f"{ranking}: top-{k} recovers {fmt(row['recovery'])} vs random-{k} "
        assert expected + with_error(row["random_mean"], row["random_std"]) in text
    assert "1 source (L0.attn.head0)" in _section_text(page, "Roles")

    limits = _section_text(page, "Limits")
    assert "2 of 24 screening prompts excluded" in limits
    wide = ScoreTable(scores).side_by_side()
    both = wide[wide["component"].isin(verified)].dropna(subset=["exact", "first_order"])
    rho = stats.spearmanr(both["first_order"], both["exact"]).statistic
    k = min(5, len(both))
    top_e = set(both.loc[both["exact"].abs().nlargest(k).index, "component"])
    top_f = set(both.loc[both["first_order"].abs().nlargest(k).index, "component"])
    assert f"Spearman {rho:.3f}, top-{k} overlap {len(top_e & top_f)}/{k}" in limits
    assert f"Spearman rank correlation {rho:.3f}" in page  # the scatter's caption states it too

    # a table change shows up in the summary: no hard-coded text
    run_tables = RunDir(run)
    changed = steering.assign(metric=steering["metric"].where(steering["direction"] != "specialized", 0.55))
    run_tables.save_table("steering", changed)
    assert "specialized model scores 0.55" in _section_text(build_report(run).read_text(), "Anchor")


def test_figures_and_tables_carry_their_uncertainty(tmp_path):
    run = _full_run(tmp_path / "run")
    page = build_report(run).read_text()
    for alt in (
        "layer x head map, weight space, first order",
        "layer x head map, weight space, exact",
        "steering curve",
    ):
        assert f'alt="{alt}"' in page, alt
    # every score cell of the verified table is "score ± stderr"
    top = page.split("<h2>Top components</h2>", 1)[1].split("</table>", 1)[0]
    cells = re.findall(r'<td class="num">([^<]*)</td>', top)
    assert cells and all(" ± " in c for c in cells if c), cells[:5]
    # exact and first-order supplier edges are ranked separately; the caption names the target kind
    assert "Suppliers ranked by exact supply" in page and "Suppliers ranked by first-order estimate supply" in page
    assert "target head's output" in html.unescape(page)
    # the roles table shows both effects with the standard errors of the scores they came from
    roles = page.split("<h3>Roles</h3>", 1)[1].split("</table>", 1)[0]
    frame = pd.read_parquet(run / "scores.parquet").set_index(["method", "component"])
    for method in ("exact", "activation"):
        row = frame.loc[(method, "L2.attn.head2")]
        assert f'<td class="num">{with_error(row["score"], row["stderr"])}</td>' in roles, method
    assert "weight-space (exact) effect" in page
    # model-level modules have no layer in the hierarchy (as in every table)
    hierarchy = page.split("Hierarchy levels", 1)[1].split("</table>", 1)[0]
    assert re.search(
        r'<td class="text">unembed</td><td class="num">3</td><td class="text">unembedding</td><td class="num"></td>',
        hierarchy,
    )


def test_supplier_caption_for_an_mlp_target(tmp_path):
    run = _minimal_run(tmp_path / "run")
    edges = pd.DataFrame(
        {
            "target": ["L2.mlp"],
            "supplier": ["L0.attn.head1"],
            "supplier_kind": ["head"],
            "supplier_layer": [0],
            "target_layer": [2],
            "supply": [0.3],
            "n_prompts": [4],
            "method": ["exact"],
        }
    )
    run.save_table("supplier_edges", edges)
    run.close()
    page = build_report(tmp_path / "run").read_text()
    assert "target MLP's output" in html.unescape(page) and "head's output" not in html.unescape(page)


def test_load_run_display_and_findings(tmp_path):
    import weightpatch

    run = weightpatch.load_run(_full_run(tmp_path / "run"))
    topics = [f["topic"] for f in run.findings()]
    assert topics[:2] == ["Anchor", "Top components"] and "Limits" in topics
    page = run._repr_html_()
    _check_html(page)
    assert "<code>sufficiency</code>" in page and "Spearman" in page


# In-page check of horizontal overflow: elements whose right edge passes the viewport, outside any
# scrolling container (tables scroll inside theirs). The result is written into the DOM for --dump-dom.
OVERFLOW_JS = """
<script>
window.addEventListener("load", () => {
  const width = document.documentElement.clientWidth;
  const scrolls = (el) => { for (let p = el.parentElement; p; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX; if (o === "auto" || o === "scroll" || o === "hidden") return true; }
    return false; };
  const bad = [];
  for (const el of document.body.querySelectorAll("*")) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > width + 1 && !scrolls(el)) bad.push(el.tagName + ":" + Math.round(r.right));
  }
  const out = document.createElement("pre");
  out.id = "overflow-result";
  out.textContent = JSON.stringify({width: width, scrollWidth: document.documentElement.scrollWidth, bad: bad});
  document.body.appendChild(out);
});
</script>
"""
CHROMIUM = Path("/usr/bin/chromium")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(command, check=True, timeout=180, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
@pytest.mark.parametrize("width", [1400, 700])
def test_renders_in_headless_chromium_without_overflow(tmp_path, width):
    """The report at a desktop and a narrow width: a screenshot is drawn and no element runs off
    the page (tables scroll inside their own containers)."""
    path = build_report(_full_run(tmp_path / "run"))
    shot = tmp_path / f"shot-{width}.png"
    _chromium(f"--screenshot={shot}", f"--window-size={width},4000", path.resolve().as_uri())
    assert _decode(shot.read_bytes())[0] == width
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text().replace("</body>", OVERFLOW_JS + "</body>"))
    dom = _chromium(
        "--virtual-time-budget=10000", f"--window-size={width},4000", "--dump-dom", probe.resolve().as_uri()
    )
    match = re.search(r'<pre id="overflow-result">(.*?)</pre>', dom.stdout, re.S)
    assert match, dom.stdout[-500:]
    result = json.loads(html.unescape(match[1]))
    assert result["width"] == width
    assert result["bad"] == [] and result["scrollWidth"] <= width, result


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
