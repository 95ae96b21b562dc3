"""Scaling on the real ~135M pair (SmolLM2-135M-Instruct vs its capitals fine-tune, see real_pair.py):
exact sweep (ours) vs the plain way vs first order, as components, prompts and anchor depth grow,
plus the exact neuron sweep against patching neurons one at a time with full forwards.

    .venv/bin/python benchmarks/bench_scaling_real.py     # ~10 minutes on 2 threads
"""

from __future__ import annotations

import argparse
import random

import torch

from bench_scaling import measure
from common import pair_and_prompts, record, timed
from weightpatch.anchors import build_anchor
from weightpatch.pair import load_pair
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen, plain_exact_scores
from weightpatch.screening.neurons import NeuronScreen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, sft, with_i, without = pair_and_prompts("smollm2")
    pair = load_pair(base, sft)
    space = pair.space

    def scorer_at(layer: int, n_prompts: int) -> AnchorScorer:
        anchor = build_anchor(pair, with_i, without, layer=layer, method="instruction")
        return AnchorScorer(pair, anchor, with_i[:n_prompts], batch_size=16)

    heads = [c.name for c in space.components(kinds=("head",))]
    rng = random.Random(0)
    rows = []
    scorer = scorer_at(20, 8)
    below = [h for h in heads if space.parse(h).layer <= 20]
    rng.shuffle(below)
    for n in (9, 27, 81):
        rows.append({"sweep": "components", "anchor_layer": 20, **measure(scorer, below[:n])})
    fixed = below[:27]
    for n in (4, 16):
        rows.append({"sweep": "prompts", "anchor_layer": 20, **measure(scorer_at(20, n), fixed)})
    shallow = [h for h in heads if space.parse(h).layer < 9]
    rng.shuffle(shallow)
    for layer in (9, 19, 29):
        rows.append({"sweep": "anchor depth", "anchor_layer": layer, **measure(scorer_at(layer, 8), shallow[:27])})
    record(
        "Scaling on the SmolLM2-135M pair (instruction anchor, 8 prompts unless varied)",
        rows,
        "components: random heads at or below the anchor layer; anchor depth: 27 random heads of layers 0-8 "
        "with the anchor at layer 9/19/29 (the truncated path re-runs blocks up to the anchor, the plain "
        "way always all 30 blocks and the unembedding). prompts: 8 (row above) vs 4 and 16.",
    )

    layer = 18
    sample = [f"L{layer}.mlp.neuron{j}" for j in range(16)]
    t: dict[str, float] = {}
    with timed(t, "batched"):
        NeuronScreen(ExactScreen(scorer), neurons_per_forward=64).run_layer(layer, progress=False)
    with timed(t, "plain"):
        plain_exact_scores(scorer, sample)
    n = space.num_neurons(layer)
    per_plain = t["plain"] / len(sample)
    record(
        f"Exact neuron sweep on the SmolLM2-135M pair (layer {layer}, anchor 20, 8 prompts)",
        [
            {
                "method": "batched NeuronScreen, all neurons of the layer",
                "neurons_per_s": n / t["batched"],
                "speedup_vs_plain": per_plain * n / t["batched"],
            },
            {
                "method": "plain (swap one neuron's weights, full forward), 16-neuron sample",
                "neurons_per_s": 1 / per_plain,
                "speedup_vs_plain": 1.0,
            },
        ],
        f"{n} neurons in {t['batched']:.1f} s batched.",
    )


if __name__ == "__main__":
    main()
