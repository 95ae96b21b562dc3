"""Screens against the exact sweep, per granularity: first-order, integrated gradients, local-exact.

    .venv/bin/python benchmarks/bench_local_exact.py --pair demo
    .venv/bin/python benchmarks/bench_local_exact.py --pair smollm2-heavy --anchor-layer 9 --prompts 8

One run, one table. The exact sweep (truncated/batched ExactScreen for heads, attention/MLP modules,
projections and layers; the batched NeuronScreen for a random sample of neurons) over every component
at or below the anchor layer is the reference (components above it score 0 under every method).
Per granularity: Spearman against exact, overlap of the top-10 by |score|, and the screen's recall
(how many of the exact top-10 by |score| are in the screen's top-20 by |score|). Times are whole
sweeps over all the granularities, as a fraction of the exact sweep's.
"""

from __future__ import annotations

import argparse
import random

import pandas as pd
import torch
from scipy.stats import spearmanr

from common import markdown_table, pair_and_prompts, record, timed
from weightpatch.anchors import search_anchor_layer
from weightpatch.components import Component
from weightpatch.pair import load_pair
from weightpatch.results import ScoreTable
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen
from weightpatch.screening.first_order import gradient_scores
from weightpatch.screening.local_exact import local_exact_scores
from weightpatch.screening.neurons import NeuronScreen

BASE_SCREENS = {"first_order": "first-order", "integrated_gradients": "IG"}


def granularity(c: Component) -> str:
    if c.kind in ("head", "layer", "neuron"):
        return {"head": "heads", "layer": "layers", "neuron": "neurons (sample)"}[c.kind]
    return "attn/MLP modules" if c.module in ("attn", "mlp") else "projections"


def exact_sweep(scorer: AnchorScorer, components: list[Component]) -> ScoreTable:
    screen = ExactScreen(scorer)
    tables = [screen.run([c for c in components if c.kind != "neuron"], progress=False)]
    neurons = NeuronScreen(screen)
    by_layer: dict[int, list[int]] = {}
    for c in components:
        if c.kind == "neuron":
            by_layer.setdefault(c.layer, []).append(c.index)  # type: ignore[arg-type]
    tables += [neurons.run_layer(layer, index, progress=False) for layer, index in sorted(by_layer.items())]
    return ScoreTable.concat(tables)


def agreement(scores: pd.DataFrame, names: list[str], method: str, top: int = 10, screen_top: int = 20) -> dict:
    e, s = scores.loc[names, "exact"], scores.loc[names, method]
    k = min(top, len(names))
    top_e, top_s = set(e.abs().nlargest(k).index), set(s.abs().nlargest(k).index)
    in_screen = set(s.abs().nlargest(min(screen_top, len(names))).index)
    return {
        "spearman": float(spearmanr(e, s).statistic),
        "top10": f"{len(top_e & top_s)}/{k}",
        "recall": f"{len(top_e & in_screen)}/{k}",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", default="demo", choices=["demo", "smollm2", "smollm2-heavy"])
    parser.add_argument("--prompts", type=int, default=16, help="scoring prompts")
    parser.add_argument("--prompt-offset", type=int, default=0, help="first scoring prompt (vary the prompt set)")
    parser.add_argument("--anchor-layer", type=int, default=None, help="default: searched on the prompts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ig-steps", type=int, default=8)
    parser.add_argument("--neurons", type=int, default=2000, help="neurons sampled at or below the anchor")
    parser.add_argument(
        "--exact-blocks", type=int, nargs="+", default=[1, 2], help="local-exact variants: blocks run exactly"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    base, sft, with_i, without = pair_and_prompts(args.pair)
    pair = load_pair(base, sft)
    half = len(with_i) // 2
    layers = None if args.anchor_layer is None else [args.anchor_layer]
    anchor, _ = search_anchor_layer(pair, with_i[:half], without[:half], with_i[half:], without[half:], layers=layers)
    texts = with_i[args.prompt_offset : args.prompt_offset + args.prompts]
    scorer = AnchorScorer(pair, anchor, texts, batch_size=args.batch_size)
    space = pair.space
    below = range(anchor.layer + 1)
    components = [
        c
        for c in space.components(kinds=("layer", "module", "head"), layers=below)
        if c.kind != "module" or not c.module.startswith("norm")  # type: ignore[union-attr]
    ]
    all_neurons = list(space.components(kinds=("neuron",), layers=below))
    components += sorted(random.Random(0).sample(all_neurons, min(args.neurons, len(all_neurons))))

    t: dict[str, float] = {}
    with timed(t, "exact"):
        exact = exact_sweep(scorer, components)
    with timed(t, "first_order"):
        first = gradient_scores(scorer, components=components, progress=False)
    with timed(t, "integrated_gradients"):
        ig = gradient_scores(scorer, components=components, steps=args.ig_steps, progress=False)
    screens = dict(BASE_SCREENS)
    tables = [exact, first, ig]
    for k in args.exact_blocks:
        method = f"local_exact_{k}"
        screens[method] = f"local-exact k={k}"
        with timed(t, method):
            local = local_exact_scores(scorer, components=components, exact_blocks=k, progress=False)
        tables.append(ScoreTable(local.frame.assign(method=method)))
    scores = ScoreTable.concat(tables).side_by_side().set_index("component")

    rows = []
    groups: dict[str, list[str]] = {}
    for c in components:
        groups.setdefault(granularity(c), []).append(c.name)
    for name, names in groups.items():
        row: dict = {"granularity": name, "n": len(names)}
        for method, label in screens.items():
            for key, value in agreement(scores, names, method).items():
                row[f"{label} {key}"] = value
        rows.append(row)
    times = [{"method": "exact sweep", "seconds": t["exact"], "fraction_of_exact": 1.0}] + [
        {"method": label, "seconds": t[method], "fraction_of_exact": t[method] / t["exact"]}
        for method, label in screens.items()
    ]
    notes = (
        f"Pair `{args.pair}` ({sum(p.numel() for p in pair.model.parameters()) / 1e6:.1f}M parameters), "
        f"{len(texts)} prompts (from #{args.prompt_offset}), anchor layer {anchor.layer} of {space.num_layers} "
        f"(held-out AUC {anchor.metrics['auc']:.2f}), {scorer.n_excluded} tiny-gap prompts excluded; every "
        f"component at or below the anchor (norms left out), {sum(c.kind == 'neuron' for c in components)} "
        f"neurons sampled; IG {args.ig_steps} steps; local-exact k: the component's block and the k-1 blocks "
        "above run exactly (neurons: own block only). top10: overlap of the top-10 by |score| with exact's; "
        "recall: exact top-10 found in the screen's top-20.\n\nTimes (whole sweep, every granularity):\n\n"
        + markdown_table(times)
    )
    record(f"Screens vs exact per granularity on the {args.pair} pair (anchor {anchor.layer})", rows, notes)
    print(markdown_table(times))


if __name__ == "__main__":
    main()
