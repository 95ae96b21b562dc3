"""The exact neuron sweep at model scale: its duration estimate against the measured time, neurons
per second by depth, and the batched neuron path before/after skipping the neuron's own block.

    .venv/bin/python benchmarks/bench_neuron_sweep.py                       # a ~10 min subset
    .venv/bin/python benchmarks/bench_neuron_sweep.py --prompts 16 --neurons 1536   # every neuron

SmolLM2-135M-Instruct against its heavy capitals fine-tune (real_pair.py; the light one when the
heavy one is missing), instruction anchor at layer 20 of 30 (2/3 depth). The sweep runs on the local
backend exactly as ``wpatch screen --method exact --kinds neuron`` runs it (calibration units first,
the estimate logged, then the rest); the subset is the first ``--neurons`` neurons of every layer at
or below the anchor on ``--prompts`` prompts. The full-scale time (every neuron of those layers) is
extrapolated with the cost model fitted on the whole subset's timings.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import pandas as pd
import torch

import real_pair
from common import markdown_table, pair_and_prompts, record
from weightpatch.anchors import build_anchor
from weightpatch.backends import LocalBackend, WorkerState
from weightpatch.backends.estimate import CostModel, Work, format_duration
from weightpatch.pair import load_pair
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen
from weightpatch.screening.neurons import NeuronScreen

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def sweep(state: WorkerState, names: list[str], clock: str = "wall") -> tuple[LocalBackend, pd.Series, float, float]:
    """Run ``names`` on the local backend from ``state``, timed by ``clock`` (``cpu``: this process's
    CPU time, for a machine shared with other jobs); (the backend, scores by component, seconds by
    ``clock``, wall seconds)."""
    timer = CLOCKS[clock]
    backend = LocalBackend(state=state, clock=timer)
    start, wall = timer(), time.perf_counter()
    table = backend.run(names, progress=False)
    return backend, table.frame.set_index("component")["score"], timer() - start, time.perf_counter() - wall


def by_layer(backend: LocalBackend) -> dict[int, tuple[int, int, float]]:
    """layer -> (neurons, blocks re-run per neuron by the old path, seconds) of the backend's last run."""
    out: dict[int, tuple[int, int, float]] = {}
    for shard, work, seconds in backend.timings:
        n, _, t = out.get(shard.layer, (0, 0, 0.0))
        out[shard.layer] = (n + work.n, round(work.depth), t + seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=2, help="scoring prompts")
    parser.add_argument("--neurons", type=int, default=128, help="first neurons of every layer in the subset")
    parser.add_argument("--anchor-layer", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare-layers", type=int, nargs="*", default=[0, 10, 19, 20], help="before/after sample")
    parser.add_argument("--compare-neurons", type=int, default=64)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="cpu: CPU seconds (a shared machine)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    logging.getLogger("weightpatch").addHandler(logging.StreamHandler(sys.stdout))
    logging.getLogger("weightpatch").setLevel(logging.INFO)

    name = "smollm2-heavy" if (real_pair.HEAVY / "model.safetensors").exists() else "smollm2"
    base, sft, with_i, without = pair_and_prompts(name)
    torch.set_num_threads(args.threads)  # real_pair.build sets 2
    pair = load_pair(base, sft)
    space, layer = pair.space, args.anchor_layer
    anchor = build_anchor(pair, with_i, without, layer=layer, method="instruction")
    scorer = AnchorScorer(pair, anchor, with_i[: args.prompts], batch_size=16)
    screen = ExactScreen(scorer)
    after = WorkerState(scorer, screen, NeuronScreen(screen))
    before = WorkerState(scorer, screen, NeuronScreen(screen, skip_own_block=False))

    # before/after on a sample of depths, same process, same prompts
    compare = [f"L{lay}.mlp.neuron{j}" for lay in args.compare_layers for j in range(args.compare_neurons)]
    rows_compare = []
    states = {"before": before, "after": after}
    results = {label: sweep(state, compare, args.clock) for label, state in states.items()}
    runs = {label: by_layer(result[0]) for label, result in results.items()}
    max_diff = float((results["before"][1] - results["after"][1].loc[results["before"][1].index]).abs().max())
    for lay in args.compare_layers:
        n, blocks, t_before = runs["before"][lay]
        t_after = runs["after"][lay][2]
        rows_compare.append(
            {
                "layer": lay,
                "blocks_before": blocks,
                "blocks_after": blocks - 1,
                "neurons": n,
                "before_neurons_per_s": n / t_before,
                "after_neurons_per_s": n / t_after,
                "speedup": t_before / t_after,
            }
        )
    print(markdown_table(rows_compare))

    # the subset sweep: estimate, then the measured time
    names = [f"L{lay}.mlp.neuron{j}" for lay in range(layer + 1) for j in range(args.neurons)]
    backend, _, measured, wall = sweep(after, names, args.clock)
    (estimate,) = backend.estimates
    rows = []
    for lay, (n, blocks, t) in sorted(by_layer(backend).items()):
        rows.append({"layer": lay, "blocks_re_run": blocks - 1, "neurons": n, "seconds": t, "neurons_per_s": n / t})
    fitted = CostModel.fit([(w, t) for _, w, t in backend.timings])
    per_layer = space.num_neurons(0)
    full = sum(fitted.seconds(Work(per_layer, per_layer * (layer - lay + 1))) for lay in range(layer + 1))
    summary = [
        {
            "sweep": f"{len(names)} neurons ({args.neurons} per layer, layers 0-{layer}), {args.prompts} prompts",
            "estimated_s": estimate.seconds,
            "measured_s": measured,
            "estimate/measured": estimate.seconds / measured,
            "wall_s": wall,
        }
    ]
    notes = (
        f"Pair `{name}`, anchor layer {layer} of {space.num_layers} (instruction anchor from 16 prompts), "
        f"{args.prompts} scoring prompts, {args.threads} torch thread(s), local backend (the path of `wpatch screen "
        f"--method exact --kinds neuron`), 64 neurons per forward, shards of 256. Estimate as logged before the rest "
        f"ran: `{estimate.message()}`; it includes the calibration's own {estimate.calibration_seconds:.0f} s. "
        f"Times ({args.clock} clock: {'CPU seconds of this process' if args.clock == 'cpu' else 'wall seconds'}) of "
        f"the whole backend run; wall_s: its wall time.\n\n"
        f"Neurons/s by depth (blocks_re_run: blocks after the neuron's own one up to the anchor):\n\n"
        + markdown_table(rows)
        + f"\n\nBefore/after skipping the neuron's own block (before = `NeuronScreen(skip_own_block=False)`: "
        f"every variant re-ran its block), {args.compare_neurons} neurons per layer, same run; largest |score "
        f"difference| {max_diff:.2g}:\n\n"
        + markdown_table(rows_compare)
        + f"\n\nExtrapolated full scale (every one of the {per_layer * (layer + 1):,} neurons of layers 0-{layer}, "
        f"cost model fitted on all of this run's timings: {fitted.per_component * 1e3:.2f} ms per neuron + "
        f"{fitted.per_block * 1e3:.2f} ms per block re-run, {args.prompts} prompts): {format_duration(full)}; "
        f"about {format_duration(full * 16 / args.prompts)} with 16 prompts (cost ~linear in prompts)."
    )
    record(f"Exact neuron sweep at model scale on the {name} pair (anchor {layer})", summary, notes)


if __name__ == "__main__":
    main()
