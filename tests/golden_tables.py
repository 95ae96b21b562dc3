"""The numbers-do-not-move guard (issue 29): every scoring engine's table on the embedded demo pair.

:data:`TABLES` runs the public functions the pipeline uses (exact and neuron screens, the local
backend, first order, integrated gradients, local-exact, activation patching in both position
modes, supplier tracing exact and first-order-then-verify, sufficiency and necessity curves) on a
fixed setup: the demo pair, an instruction anchor at layer 2 of 4 built from 16 anchor-split prompts,
8 held-out prompts in two batches of 4. Running this file rewrites ``tests/data/golden/`` (one CSV
Parquet file per table, so floats read back bit for bit, plus ``meta.json`` naming the commit
the tables were made from); ``tests/test_golden.py`` checks that
the code reproduces them::

    OMP_NUM_THREADS=1 PYTHONPATH=src python tests/golden_tables.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from weightpatch import demo
from weightpatch.activation import Positions, activation_scores, default_components
from weightpatch.anchors import build_anchor
from weightpatch.backends import LocalBackend
from weightpatch.pair import ModelPair, load_pair
from weightpatch.results import ScoreTable
from weightpatch.runner import render_prompts
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen
from weightpatch.screening.first_order import gradient_scores
from weightpatch.screening.local_exact import local_exact_scores
from weightpatch.screening.neurons import NeuronScreen
from weightpatch.tracing import trace_suppliers
from weightpatch.validation import necessity_curve, sufficiency_curve

GOLDEN = Path(__file__).parent / "data" / "golden"
ANCHOR_LAYER = 2
NEURONS = [0, 1, 5, 77, 200, 383]  # a few neurons of each layer for the per-component engines
TARGETS = ["L2.attn.head1", "L2.mlp.neuron5", "L1.attn.head0"]


def setup() -> tuple[ModelPair, AnchorScorer]:
    """The demo pair and the scorer every table is computed on."""
    paths = demo.paths()
    pair = load_pair(paths.base, paths.specialized, dtype="float32")
    anchor_records = demo.prompts("anchor")[:16]
    with_instr = render_prompts(pair.tokenizer, [r.prompt for r in anchor_records])
    without = render_prompts(pair.tokenizer, [r.prompt_without_instruction for r in anchor_records])
    anchor = build_anchor(pair, with_instr, without, ANCHOR_LAYER, method="instruction")
    texts = render_prompts(pair.tokenizer, [r.prompt for r in demo.prompts("heldout")[:8]])
    return pair, AnchorScorer(pair, anchor, texts, batch_size=4)


def _components(space) -> list[str]:
    names = [str(c) for c in space.components(kinds=("layer", "module", "head"))]
    return names + [f"L{layer}.mlp.neuron{j}" for layer in range(space.num_layers) for j in NEURONS]


def _candidates(space) -> list[str]:
    names = [str(c) for c in space.components(kinds=("head",))]
    return names + [f"L{layer}.mlp.neuron{j}" for layer in range(space.num_layers) for j in NEURONS] + ["L0.attn"]


def _activation(scorer: AnchorScorer, positions: Positions) -> pd.DataFrame:
    space = scorer.pair.space
    acts = default_components(space, kinds=("layer", "module", "head"), modules=("attn", "mlp", "attn.o"))
    acts += [space.validate(f"L{layer}.mlp.neuron{j}") for layer in range(space.num_layers) for j in NEURONS]
    return activation_scores(scorer, acts, positions=positions).frame


def _curve(scorer: AnchorScorer, curve: Callable[..., pd.DataFrame]) -> pd.DataFrame:
    ranking = ScoreTable(read("exact"))
    frame = curve(scorer, ranking, ks=[1, 2, 4, 8], kind="head", controls=5, seed=3, kl=True)
    return frame.assign(components=frame["components"].map(" ".join))


def _neurons(scorer: AnchorScorer) -> pd.DataFrame:
    """Every fourth neuron of each layer by the neuron sweep (its anchor-block and above-anchor paths included)."""
    screen = NeuronScreen(ExactScreen(scorer), neurons_per_forward=40)
    layers = range(scorer.pair.space.num_layers)
    return ScoreTable.concat(screen.run_layer(layer, range(0, 384, 4), progress=False) for layer in layers).frame


TABLES: dict[str, Callable[[AnchorScorer], pd.DataFrame]] = {
    "exact": lambda s: ExactScreen(s, variants_per_batch=3).run(_components(s.pair.space), progress=False).frame,
    "neurons": lambda s: _neurons(s),
    "exact_backend": lambda s: (
        LocalBackend.from_scorer(s, 8, estimate=False).run(_components(s.pair.space), progress=False).frame
    ),
    "first_order": lambda s: gradient_scores(s, progress=False).frame,
    "integrated_gradients": lambda s: (
        gradient_scores(s, kinds=("layer", "module", "head"), steps=2, progress=False).frame
    ),
    "local_exact_1": lambda s: local_exact_scores(s, components=_components(s.pair.space), progress=False).frame,
    "local_exact_2": lambda s: (
        local_exact_scores(s, components=_components(s.pair.space), exact_blocks=2, progress=False).frame
    ),
    "activation_all": lambda s: _activation(s, "all"),
    "activation_last": lambda s: _activation(s, "last"),
    "supply_exact": lambda s: trace_suppliers(s, TARGETS, _candidates(s.pair.space)),
    "supply_exact_all": lambda s: trace_suppliers(s, TARGETS, _candidates(s.pair.space), positions="all"),
    "supply_first_order": lambda s: trace_suppliers(
        s, TARGETS, _candidates(s.pair.space), method="first_order", verify_top=3
    ),
    "sufficiency": lambda s: _curve(s, sufficiency_curve),
    "necessity": lambda s: _curve(s, necessity_curve),
}


def write(scorer: AnchorScorer) -> None:
    """Compute and write every table (in :data:`TABLES` order: the curves rank by ``exact``)."""
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for name, table in TABLES.items():
        table(scorer).to_parquet(GOLDEN / f"{name}.parquet", index=False, compression="zstd")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=GOLDEN).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True).stdout)
    meta = {"commit": commit, "src_dirty": dirty, "torch": torch.__version__, "tables": list(TABLES)}
    (GOLDEN / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def read(name: str) -> pd.DataFrame:
    return pd.read_parquet(GOLDEN / f"{name}.parquet")


if __name__ == "__main__":
    torch.set_num_threads(1)
    write(setup()[1])
    sys.exit(0)
