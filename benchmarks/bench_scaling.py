"""How exact-sweep and first-order costs grow with components, layers and prompts.

    .venv/bin/python benchmarks/bench_scaling.py            # ~3-6 minutes on 1 thread
    .venv/bin/python benchmarks/bench_scaling.py --no-ray   # without the Ray backend section

Pairs: tiny Llama pairs built from configs (hidden 128, 4 heads / 2 KV heads, MLP 384, the demo
tokenizer's 1024-token vocabulary; 4, 8 and 16 layers; specialized = base + Gaussian noise), and
the embedded demo pair (4 layers, same sizes, trained). Prompts: the demo's held-out prompts.

In the same run, for each size:
- ``exact``: :class:`ExactScreen` (cached block inputs, truncated at the anchor, variants stacked;
  its setup, one forward per batch, included);
- ``plain``: :func:`plain_exact_scores` (swap weights, full forward through the unembedding);
- ``first_order``: :func:`gradient_scores` of the same components (one backward per batch);
- ``first_order_all``: first-order scores of every component of every kind, neurons included.
The scorer's own setup (the base and specialized forwards, shared by all methods) is not timed.

Sweeps: layers (4/8/16 layers; all heads + MLP modules; anchor at the last layer), components
(8-layer pair; 12/40/120 heads and modules in a fixed random order), prompts (8-layer pair; 8/16/32/64
prompts), and on the demo pair components x prompts. Optionally the Ray backend (2 workers, local
cluster) against the local backend on the demo pair, actor start-up included.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from common import record, timed
from weightpatch import demo
from weightpatch.anchors import build_anchor
from weightpatch.pair import load_pair
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen, plain_exact_scores
from weightpatch.screening.first_order import gradient_scores

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def make_llama_pair(root: Path, layers: int, noise: float = 0.01, seed: int = 0) -> tuple[Path, Path]:
    """A random Llama of the demo's sizes with ``layers`` blocks and a noisy copy of it."""
    src = demo.paths().base
    config = transformers.LlamaConfig.from_pretrained(src)
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1: make every parameter informative
        for p in base.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sft = AutoModelForCausalLM.from_config(config).eval()
    sft.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sft.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    dirs = []
    for name, model in (("base", base), ("sft", sft)):
        d = root / f"llama{layers}-{name}"
        model.save_pretrained(d)
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy(src / f, d / f)
        dirs.append(d)
    return dirs[0], dirs[1]


def heads_and_mlps(space) -> list[str]:
    return [c.name for c in space.components(kinds=("head",))] + [
        c.name for c in space.components(kinds=("module",)) if c.module == "mlp"
    ]


def measure(scorer: AnchorScorer, components: list[str], plain: bool = True) -> dict:
    t: dict[str, float] = {}
    with timed(t, "exact"):
        fast = ExactScreen(scorer).run(components, progress=False)
    row = {"components": len(components), "prompts": len(scorer.texts), "exact_s": t["exact"]}
    if plain:
        with timed(t, "plain"):
            slow = plain_exact_scores(scorer, components)
        diff = (fast.frame.set_index("component")["score"] - slow.frame.set_index("component")["score"]).abs().max()
        row |= {"plain_s": t["plain"], "speedup": t["plain"] / t["exact"], "max_diff": float(diff)}
    row["max_abs_score"] = float(fast.frame["score"].abs().max())
    with timed(t, "fo"):
        gradient_scores(scorer, components=components, progress=False)
    with timed(t, "fo_all"):
        everything = gradient_scores(scorer, progress=False)
    row |= {
        "exact_ms_per_comp": 1000 * t["exact"] / len(components),
        "first_order_s": t["fo"],
        "first_order_all_s": t["fo_all"],
        "all_components": len(everything),
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray backend section")
    parser.add_argument("--only-ray", action="store_true", help="run only the Ray backend section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    records = demo.prompts("heldout")
    texts = [r.prompt for r in records]
    notes = (
        "Times in seconds (1 run each, shared 2-core machine, so expect ~10-20% noise). exact = ExactScreen "
        "(setup included), plain = plain_exact_scores (full forward per component), speedup = plain/exact, "
        "max_diff = largest |exact - plain| score. first_order = gradient_scores of the same components, "
        "first_order_all = of every component of every kind (all_components, neurons included). "
        f"Batch size {args.batch_size}; prompts from the demo held-out set."
    )
    if args.only_ray:
        paths = demo.paths()
        ray_section(paths, demo_anchor(load_pair(paths.base, paths.specialized)), texts[:16], args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        # ---- layers --------------------------------------------------------------------------
        rows, pairs = [], {}
        for layers in (4, 8, 16):
            pairs[layers] = make_llama_pair(Path(tmp), layers)
            pair = load_pair(*pairs[layers])
            anchor = build_anchor(pair, texts[:16], None, layer=layers - 1, method="model_diff")
            scorer = AnchorScorer(pair, anchor, texts[16:32], args.batch_size)
            rows.append({"layers": layers, **measure(scorer, heads_and_mlps(pair.space))})
            print(rows[-1], flush=True)
        record("Scaling with layers (tiny Llama, hidden 128, all heads + MLPs, anchor at the last layer)", rows, notes)

        # ---- components and prompts (8 layers) ------------------------------------------------
        pair = load_pair(*pairs[8])
        anchor = build_anchor(pair, texts[:16], None, layer=7, method="model_diff")
        pool = [c.name for c in pair.space.components(kinds=("head", "module"))]
        random.Random(0).shuffle(pool)
        scorer = AnchorScorer(pair, anchor, texts[16:32], args.batch_size)
        rows = []
        for n in (12, 40, 120):
            rows.append({"layers": 8, **measure(scorer, pool[:n])})
            print(rows[-1], flush=True)
        record("Scaling with components (tiny Llama, 8 layers, heads and modules)", rows, notes)
        rows = []
        for n_prompts in (8, 16, 32, 64):
            scorer = AnchorScorer(pair, anchor, texts[32 : 32 + n_prompts], args.batch_size)
            rows.append({"layers": 8, **measure(scorer, heads_and_mlps(pair.space))})
            print(rows[-1], flush=True)
        record("Scaling with prompts (tiny Llama, 8 layers, all heads + MLPs)", rows, notes)

    # ---- the demo pair -------------------------------------------------------------------------
    paths = demo.paths()
    pair = load_pair(paths.base, paths.specialized)
    anchor = demo_anchor(pair)
    pool = [c.name for c in pair.space.components(kinds=("head", "module"))]
    random.Random(0).shuffle(pool)
    rows = []
    for n_prompts in (8, 16, 32):
        scorer = AnchorScorer(pair, anchor, texts[:n_prompts], args.batch_size)
        for n in (8, 24, len(pool)):
            rows.append({"pair": "demo", **measure(scorer, pool[:n])})
            print(rows[-1], flush=True)
    record("Scaling on the demo pair (4 layers, instruction anchor at layer 2): components x prompts", rows, notes)

    if not args.no_ray:
        ray_section(paths, anchor, texts[:16], args)
    print(f"total {time.perf_counter() - start:.0f} s")


def demo_anchor(pair):
    """The instruction anchor at layer 2 of the demo pair, from 48 anchor prompts."""
    records = demo.prompts("anchor")[:48]
    return build_anchor(
        pair,
        [r.prompt for r in records],
        [r.prompt_without_instruction for r in records],
        layer=2,
        method="instruction",
    )


def ray_section(paths, anchor, texts, args) -> None:
    """Local backend vs Ray backend (2 workers, actor start-up included) on the demo pair."""
    try:
        import ray
    except ImportError:
        print("ray not installed: skipping the Ray section")
        return
    from weightpatch.backends import JobSpec, LocalBackend
    from weightpatch.backends.ray_backend import RayBackend

    job = JobSpec(paths.base, paths.specialized, anchor, texts, batch_size=args.batch_size)
    pair = load_pair(paths.base, paths.specialized)
    components = [c.name for c in pair.space.components(kinds=("head", "module"))]
    components += [f"L{layer}.mlp.neuron{j}" for layer in range(3) for j in range(384)]
    t: dict[str, float] = {}
    with timed(t, "local"):
        backend = LocalBackend(job)
        with timed(t, "local_setup"):
            backend.state  # noqa: B018 (loads the pair, scores base/specialized, caches block inputs)
        with timed(t, "local_run"):
            local = backend.run(components, progress=False)
        local_estimate = sum(e.seconds for e in backend.estimates)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        with timed(t, "ray"), RayBackend(job, workers=2, num_cpus=1) as backend:
            remote = backend.run(components, progress=False)
            ray_setup, ray_run = backend.durations["start_workers_s"], backend.durations["run_s"]
            ray_estimate = backend.wall_estimate
    finally:
        ray.shutdown()
    a, b = local.frame.set_index("component")["score"], remote.frame.set_index("component")["score"]
    rows = [
        {
            "backend": "local (1 process)",
            "components": len(local),
            "seconds": t["local"],
            "setup_s": t["local_setup"],
            "run_s": t["local_run"],
            "estimated_run_s": local_estimate,
            "estimate_ratio": local_estimate / t["local_run"],
            "max_diff": 0.0,
        },
        {
            "backend": "ray (2 actors x 1 CPU)",
            "components": len(remote),
            "seconds": t["ray"],
            "setup_s": ray_setup,
            "run_s": ray_run,
            "estimated_run_s": ray_estimate,
            "estimate_ratio": ray_estimate / ray_run,
            "max_diff": float((a - b.loc[a.index]).abs().max()),
        },
    ]
    record(
        "Exact sweep backends on the demo pair (heads, modules, 1152 neurons of layers 0-2; 16 prompts)",
        rows,
        "Both include loading the pair and the scorer setup; Ray also starts its local cluster's actors "
        "(each loads the pair once). Neurons go through NeuronScreen in shards of 256, heads/modules in "
        "shards of 8. setup_s: loading the job (Ray: starting both actors, each loading the pair and scoring base "
        "and specialized, in parallel). run_s: the sweep itself; estimated_run_s: the duration the backend "
        "logged once its calibration units were back (Ray: wall time on its 2 actors). max_diff = largest "
        "|ray - local| score.",
    )


if __name__ == "__main__":
    main()
