"""The exact sweep against its floor (issue 21, item 6), by default on the SmolLM2-135M caps pair.

A component of layer l needs blocks l..anchor only, so an exact sweep cannot beat the plain loop
(full forward per component, through the unembedding) by more than the ratio of the blocks each
re-runs, its floor. This script measures, in one run on the same prompts:

- the plain loop (``plain_exact_scores``);
- the exact sweep with a full anchor block (every position's MLP and attention output projection);
- the exact sweep as shipped (the anchor block computes only the last position, which is all the
  anchor reads);
- the floors: the plain forward's time over the sum of the per-block times each component re-runs,
  with the anchor block timed in full and on the last position only.

    .venv/bin/python benchmarks/bench_exact_floor.py     # ~15 minutes on 2 threads
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch

import weightpatch.scoring
import weightpatch.screening.exact
from common import pair_and_prompts, record
from weightpatch.anchors import build_anchor
from weightpatch.pair import load_pair
from weightpatch.runner import run_segment
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen, plain_exact_scores


def _median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _full_anchor_block(*args, last_position: bool = False, **kwargs):
    """run_segment as before the last-position anchor block: every position of it computed."""
    out, captured = run_segment(*args, **kwargs)
    return (out[:, -1:] if last_position else out), captured


def block_times(scorer: AnchorScorer, stack: int = 8) -> tuple[list[float], float, float, float]:
    """Per prompt set: (time of block i from its cached input for i = 0..anchor, the anchor block
    on the last position only, one plain full forward, the per-variant time of the block below the
    anchor with ``stack`` variants stacked over its time alone), each time a median of 3."""
    pair, anchor = scorer.pair, scorer.layer
    inputs = scorer.block_inputs()
    with torch.no_grad():

        def block(i: int, last: bool = False) -> None:
            for j, b in enumerate(scorer.batches):
                run_segment(pair.model, pair.space, b, stop=i, start=i, hidden_in=inputs[j].get(i), last_position=last)

        per_block = [_median_time(lambda i=i: block(i)) for i in range(anchor + 1)]
        anchor_last = _median_time(lambda: block(anchor, last=True))
        full = _median_time(lambda: [pair.model(**b.kwargs(), use_cache=False) for b in scorer.batches])

        def stacked(i: int) -> None:
            for j, b in enumerate(scorer.batches):
                hidden = inputs[j][i].repeat(stack, 1, 1)
                run_segment(pair.model, pair.space, b.repeat(stack), stop=i, start=i, hidden_in=hidden)

        gain = _median_time(lambda: stacked(anchor - 1)) / stack / per_block[anchor - 1]
    return per_block, anchor_last, full, gain


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pair", default="smollm2", help="smollm2 (default), smollm2-heavy or demo")
    parser.add_argument("--anchor-layer", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, sft, with_i, without = pair_and_prompts(args.pair)
    pair = load_pair(base, sft)
    space, anchor_layer = pair.space, args.anchor_layer
    anchor = build_anchor(pair, with_i, without, layer=anchor_layer, method="instruction")
    scorer = AnchorScorer(pair, anchor, with_i[: args.prompts], batch_size=16)
    below = [c.name for c in space.components(kinds=("head",), layers=range(anchor_layer + 1))]
    below += [f"L{layer}.{m}" for layer in range(anchor_layer + 1) for m in ("attn", "mlp")]
    n_all = len(list(space.components(kinds=("head",)))) + 2 * space.num_layers

    def sweep(last_position: bool) -> tuple[float, pd.Series]:
        """One exact sweep (its scorer's setup included), with or without the last-position anchor block."""
        saved = weightpatch.screening.exact.run_segment, weightpatch.scoring.run_segment
        if not last_position:
            weightpatch.screening.exact.run_segment = weightpatch.scoring.run_segment = _full_anchor_block
        try:
            start = time.perf_counter()
            fresh = AnchorScorer(pair, anchor, with_i[: args.prompts], batch_size=16)
            scores = ExactScreen(fresh).run(below, progress=False).frame.set_index("component")["score"]
            return time.perf_counter() - start, scores
        finally:
            weightpatch.screening.exact.run_segment, weightpatch.scoring.run_segment = saved

    # each sweep twice, interleaved with the plain loop, the faster run of each counted (shared machine)
    runs: dict[bool, list[tuple[float, pd.Series]]] = {True: [], False: []}
    for last_position in (False, True):
        runs[last_position].append(sweep(last_position))
    start = time.perf_counter()
    plain = plain_exact_scores(scorer, below).frame.set_index("component")["score"]
    plain_s = time.perf_counter() - start
    for last_position in (False, True):
        runs[last_position].append(sweep(last_position))

    per_block, anchor_last, full_forward, gain = block_times(scorer)

    layers = [space.parse(c).layer for c in below]

    def speedup_bound(anchor_block: float) -> float:
        """The speedup if the sweep did nothing but its blocks (its time floor): a component of layer l
        runs block l alone, then blocks l+1..anchor stacked with the other variants."""
        cost = sum(
            anchor_block
            if layer == anchor_layer
            else per_block[layer] + gain * (sum(per_block[layer + 1 : -1]) + anchor_block)
            for layer in layers
        )
        return len(below) * full_forward / cost

    rows = []
    for last_position, name in (
        (False, "exact sweep, full anchor block"),
        (True, "exact sweep, last-position anchor block (shipped)"),
    ):
        seconds, scores = min(runs[last_position], key=lambda r: r[0])
        rows.append(
            {
                "method": name,
                "seconds": seconds,
                "runs_s": "/".join(f"{r[0]:.1f}" for r in runs[last_position]),
                "speedup": plain_s / seconds,
                "speedup_bound": speedup_bound(anchor_last if last_position else per_block[-1]),
                "speedup_all_components": plain_s / len(below) * n_all / seconds,
                "max_abs_diff_vs_plain": float((scores - plain).abs().max()),
            }
        )
    record(
        f"Exact sweep against its floor ({args.pair} pair, anchor {anchor_layer} of {space.num_layers})",
        rows,
        f"{len(below)} heads and attn/mlp modules at or below the anchor, {len(scorer.texts)} prompts in batches "
        f"of 16; plain = plain_exact_scores ({plain_s:.1f} s, full forward through the unembedding per "
        "component). speedup_bound: the speedup if the sweep did nothing but its blocks (its time floor): "
        "a plain forward's time "
        "over, per component, its own block alone plus the blocks above it stacked 8 variants per forward "
        f"(each block timed from its cached input, median of 3; stacked, a block costs {gain:.2f} of its "
        f"unstacked time per variant), the anchor block in full ({per_block[-1] * 1000:.0f} ms per prompt set) "
        f"or on the last position ({anchor_last * 1000:.0f} ms); a plain forward {full_forward * 1000:.0f} ms. "
        "seconds: the faster of the two runs in runs_s (interleaved with the plain loop). "
        f"speedup_all_components counts the {n_all - len(below)} "
        f"components above the anchor too (scored 0 without running anything; the plain loop would run them). "
        f"max_abs_diff_vs_plain: largest |score - plain score| over the {len(below)} components.",
    )


if __name__ == "__main__":
    main()
