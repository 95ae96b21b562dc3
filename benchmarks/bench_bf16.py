"""Does bfloat16 keep the rankings? Scores of the SmolLM2-135M pair in bfloat16 vs float32, per kind.

    .venv/bin/python benchmarks/bench_bf16.py [30]    # ~10-20 min: ~/.cache/weightpatch-bench/wp32-bf16-x1.json
    .venv/bin/python benchmarks/bench_bf16.py record   # the agreement table -> RESULTS.md

The pair: SmolLM2-135M-Instruct and the same base with the 1B pair's fine-tune-like change (low-rank +
dense, ~1e-3 relative per matrix; benchmarks/bench_scale.py), or (argument 30) one 30 times stronger.
One float32 model-difference anchor at layer 15 of 30 from 8 short prompts, used by both dtypes (the
anchor is a direction, not a dtype). Per dtype: first-order scores of every head, attn/MLP block and
neuron at or below the anchor, exact scores of every head and attn/MLP block, and exact scores of 256
neurons (layers 3, 7, 11, 15: per layer the 32 with the largest float32 first-order |score| and 32
drawn at random, seed 0) through the batched neuron path. Per kind and method: Spearman rank
correlation of the bfloat16 scores with the float32 ones, and the top-10 overlap (shared members of
the two top-10 by |score|, out of 10). Also the anchor gaps in both dtypes against bfloat16's
round-off of the residual stream at the anchor (``eps x ||h||``).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
import bench_scale
import real_pair

STRENGTHS = (1.0, 30.0)  # x 1e-3 relative change: the scale benchmark's pair, and one 30 times stronger
LAYER, NEURON_LAYERS, PER_LAYER = 15, (3, 7, 11, 15), 32


def out_file(strength: float) -> Path:
    return real_pair.WORK / f"wp32-bf16-x{strength:g}.json"


def smollm2_pair(strength: float) -> tuple[str, str]:
    """SmolLM2 and the scale benchmark's fine-tune-like (low-rank + dense) change, ``strength`` times it."""
    real_pair.build_base()
    return str(real_pair.BASE), str(bench_scale.smollm2_expert(1, strength))


def scores_of(
    dtype: str, pair_dirs: tuple[str, str], anchor, texts: list[str], sample: dict[int, list[int]] | None
) -> dict:
    """{method: {component: score}} of one dtype, and the gap statistics."""
    from weightpatch.pair import load_pair
    from weightpatch.runner import run_segment
    from weightpatch.scoring import AnchorScorer
    from weightpatch.screening.exact import ExactScreen
    from weightpatch.screening.first_order import gradient_scores
    from weightpatch.screening.neurons import NeuronScreen

    pair = load_pair(*pair_dirs, dtype=dtype)
    scorer = AnchorScorer(pair, anchor, texts, batch_size=8)
    below = range(LAYER + 1)
    sites = [str(c) for c in pair.space.components(kinds=("head",), layers=below)]
    sites += [str(c) for c in pair.space.components(kinds=("module",), layers=below) if c.module in ("attn", "mlp")]
    neurons = [str(c) for c in pair.space.components(kinds=("neuron",), layers=below)]
    start = time.perf_counter()
    first = gradient_scores(scorer, components=sites + neurons, per_prompt=False, progress=False).frame
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    exact = ExactScreen(scorer).run(sites, progress=False).frame
    exact_s = time.perf_counter() - start
    if sample is None:  # float32 picks the neuron sample: top by first order + random
        rng = random.Random(0)
        sample = {}
        for layer in NEURON_LAYERS:
            rows = first[first["component"].str.startswith(f"L{layer}.mlp.neuron")]
            top = rows.reindex(rows["score"].abs().sort_values(ascending=False).index)["component"].head(PER_LAYER)
            picked = {int(name.rsplit("neuron", 1)[1]) for name in top}
            rest = [i for i in range(pair.space.num_neurons(layer)) if i not in picked]
            sample[layer] = sorted(picked | set(rng.sample(rest, PER_LAYER)))
    screen = NeuronScreen(ExactScreen(scorer))
    neuron_exact = [screen.run_layer(layer, neurons=index, progress=False).frame for layer, index in sample.items()]
    eps = torch.finfo(torch.bfloat16).eps
    with torch.no_grad():
        norms = torch.cat(
            [
                run_segment(pair.model, pair.space, b, stop=LAYER, last_position=True)[0][:, -1].float().norm(dim=-1)
                for b in scorer.batches
            ]
        )
    table = {
        "first_order": dict(zip(first["component"], first["score"], strict=True)),
        "exact": dict(zip(exact["component"], exact["score"], strict=True)),
    }
    for frame in neuron_exact:
        table["exact"].update(zip(frame["component"], frame["score"], strict=True))
    return {
        "scores": table,
        "sample": sample,
        "seconds": {"first_order": first_s, "exact": exact_s},
        "gap_median": float(scorer.gap.abs().median()),
        "roundoff_median": float((eps * norms).median()),
    }


def kind_of(name: str) -> str:
    return "neuron" if ".neuron" in name else "head" if ".head" in name else "attn/MLP block"


def agreement(a: dict[str, float], b: dict[str, float]) -> list[dict]:
    """Per kind: Spearman of b against a over their shared components, and top-10 overlap by |score|."""
    rows = []
    for kind in ("head", "attn/MLP block", "neuron"):
        names = [n for n in a if n in b and kind_of(n) == kind]
        if len(names) < 10:
            continue
        x, y = [a[n] for n in names], [b[n] for n in names]
        top_a = set(sorted(names, key=lambda n: -abs(a[n]))[:10])
        top_b = set(sorted(names, key=lambda n: -abs(b[n]))[:10])
        rows.append({"kind": kind, "n": len(names), "spearman": float(spearmanr(x, y)[0]), "top10": len(top_a & top_b)})
    return rows


def run(strength: float) -> None:
    from weightpatch.anchors import build_anchor
    from weightpatch.pair import load_pair

    torch.set_num_threads(1)
    texts = real_pair.prompts(False)[:8]
    pair_dirs = smollm2_pair(strength)
    anchor = build_anchor(load_pair(*pair_dirs), texts, None, LAYER, method="model_diff", batch_size=8)
    f32 = scores_of("float32", pair_dirs, anchor, texts, None)
    b16 = scores_of("bfloat16", pair_dirs, anchor, texts, f32["sample"])
    rows = []
    for method in ("first_order", "exact"):
        for row in agreement(f32["scores"][method], b16["scores"][method]):
            rows.append({"method": method, **row})
    result = {
        "rows": rows,
        "seconds": {"float32": f32["seconds"], "bfloat16": b16["seconds"]},
        "gap_median": {"float32": f32["gap_median"], "bfloat16": b16["gap_median"]},
        "roundoff_median_bf16": b16["roundoff_median"],
    }
    out_file(strength).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def record_table() -> None:
    from common import record

    rows, notes = [], []
    for strength in STRENGTHS:
        if not out_file(strength).is_file():
            continue
        result = json.loads(out_file(strength).read_text())
        g, s = result["gap_median"], result["seconds"]
        ratio = g["bfloat16"] / result["roundoff_median_bf16"]
        rows += [{"change": f"{strength:g}e-3", "gap/roundoff": ratio, **r} for r in result["rows"]]
        notes.append(
            f"change {strength:g}e-3: median anchor gap {g['float32']:.3g} (float32) / {g['bfloat16']:.3g} (bfloat16) "
            f"vs bfloat16 round-off eps x ||h|| = {result['roundoff_median_bf16']:.3g}; times (s) first order "
            f"{s['float32']['first_order']:.0f} / {s['bfloat16']['first_order']:.0f}, exact heads+blocks "
            f"{s['float32']['exact']:.0f} / {s['bfloat16']['exact']:.0f} (float32 / bfloat16)"
        )
    record(
        "bfloat16 vs float32 rankings per kind (SmolLM2-135M + fine-tune-like change)",
        rows,
        f"8 short prompts, one float32 model-difference anchor at layer {LAYER} of 30 for both dtypes; gap/roundoff: "
        "the bfloat16 median anchor gap over bfloat16's round-off of the residual at the anchor. Neuron rows: first "
        f"order over every neuron of layers 0-{LAYER}, exact over a 256-neuron sample. " + "; ".join(notes) + ".",
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["record"]:
        record_table()
    else:
        run(float(sys.argv[1]) if sys.argv[1:] else 1.0)
