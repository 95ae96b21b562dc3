"""One base block-input cache per scorer, shared by the engines of a trace run, vs one per engine.

A `wpatch trace` run builds activation-patching, supplier-tracing and exact (verification) engines on
one scorer. Before, each built its own cache of the base model's block inputs (one base forward per
prompt batch up to the anchor, holding every block's input); now the scorer builds it once
(`AnchorScorer.block_inputs`). In the same run this script times the whole trace stage both ways
(the old way by making every engine's request rebuild the cache) and counts cache builds and bytes.

    .venv/bin/python benchmarks/bench_block_cache.py --pair demo
    .venv/bin/python benchmarks/bench_block_cache.py --pair smollm2 --prompts 16   # cache cost only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import record
from weightpatch.config import AnchorConfig, TraceConfig
from weightpatch.pipeline import open_pair, run_anchor, run_trace
from weightpatch.runner import render_prompts
from weightpatch.scoring import AnchorScorer


def cache_bytes(cache: list[dict[int, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for per_batch in cache for t in per_batch.values())


def trace_both_ways(base: Path, sft: Path, prompts: Path, n_prompts: int) -> list[dict]:
    rows = []
    original = AnchorScorer.block_inputs
    for way in ("one cache per engine (before)", "one shared cache (now)"):
        builds: list[int] = []

        def counting(self, top=None, _way=way, builds=builds):
            if _way.startswith("one cache per engine"):
                self._block_inputs = None  # every engine's request rebuilds, as each engine did
            before = self._block_inputs
            out = original(self, top)
            if out is not before:
                builds.append(cache_bytes(out))
            return out

        AnchorScorer.block_inputs = counting  # type: ignore[method-assign]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                common = {"base": str(base), "specialized": str(sft), "run_dir": Path(tmp), "progress": False}
                acfg = AnchorConfig(**common, prompts=prompts, method="model_diff", steering_prompts=0)
                pair = open_pair(acfg)
                run_anchor(acfg, pair)
                start = time.perf_counter()
                run_trace(TraceConfig(**common, prompts=prompts, max_prompts=n_prompts), pair)
                seconds = time.perf_counter() - start
        finally:
            AnchorScorer.block_inputs = original  # type: ignore[method-assign]
        rows.append(
            {"way": way, "trace_seconds": seconds, "cache_builds": len(builds), "cache_MB_built": sum(builds) / 2**20}
        )
    rows.append({"way": "ratio before/now", "trace_seconds": rows[0]["trace_seconds"] / rows[1]["trace_seconds"],
                 "cache_builds": rows[0]["cache_builds"] / rows[1]["cache_builds"],
                 "cache_MB_built": rows[0]["cache_MB_built"] / rows[1]["cache_MB_built"]})  # fmt: skip
    return rows


def cache_cost(model_dir: Path, texts: list[str], layer: int) -> list[dict]:
    """Time and size of one block-input cache (what each engine used to build for itself): the base
    model's input of every block 1..layer for ``texts``, batches of 16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightpatch.components import ComponentSpace
    from weightpatch.runner import batches, encode, run_segment

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    space = ComponentSpace.from_model(model)
    encoded = encode(tokenizer, render_prompts(tokenizer, texts))
    start = time.perf_counter()
    with torch.no_grad():
        cache = [
            run_segment(model, space, b, stop=layer, capture_inputs=range(1, layer + 1))[1]
            for b in batches(encoded, 16)
        ]
    seconds = time.perf_counter() - start
    row = {"model": model_dir.name, "anchor_layer": layer, "prompts": len(texts), "build_seconds": seconds}
    return [{**row, "cache_MB": cache_bytes(cache) / 2**20, "saved_per_trace_run": "2 builds (activation, tracing)"}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", default="demo", choices=["demo", "smollm2"])
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.pair == "demo":
        from weightpatch import demo

        paths = demo.paths()
        rows = trace_both_ways(paths.base, paths.specialized, demo.prompt_path("heldout"), args.prompts)
        record(f"Shared block-input cache: trace stage on the demo pair, {args.prompts} prompts", rows)
    else:
        base = Path.home() / ".cache" / "weightpatch-bench" / "smollm2-base"
        if not (base / "model.safetensors").is_file():
            sys.path.insert(0, str(Path(__file__).parent))
            import real_pair

            base = Path(real_pair.build()[0])
        texts = [f"Write a short note about topic {i} in all capital letters." for i in range(args.prompts)]
        rows = cache_cost(base, texts, layer=20)
        record("Shared block-input cache: cost of one cache on SmolLM2-135M (anchor layer 20)", rows)


if __name__ == "__main__":
    main()
