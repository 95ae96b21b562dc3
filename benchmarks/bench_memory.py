"""Peak memory of loading a pair: receiver + lazy donor vs two full models (each in a fresh process).

.venv/bin/python benchmarks/bench_memory.py --pair smollm2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import pair_and_prompts, record

CHILD = r"""
import json, resource, sys, torch
mode, base, sft = sys.argv[1:4]
torch.set_num_threads(1)
def materialize(model):  # from_pretrained memory-maps safetensors: touch every weight so it is resident
    with torch.no_grad():
        return sum(float(p.float().sum()) for p in model.parameters())
if mode == "lazy":
    from weightpatch.pair import load_pair
    from weightpatch.patch import patched
    pair = load_pair(base, sft)
    materialize(pair.model)
    for layer in pair.space.components(kinds=("layer",)):  # every decoder weight read from the donor
        with patched(pair.model, pair.donor, pair.space, [layer]):
            pass
    with patched(pair.model, pair.donor, pair.space, pair.space.model_level_modules()):
        pass
    n = sum(p.numel() for p in pair.model.parameters())
elif mode == "two_models":
    from transformers import AutoModelForCausalLM
    a = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    materialize(a), materialize(b)
    n = sum(p.numel() for p in a.parameters())
else:
    import transformers, weightpatch.pair  # noqa: F401  (import cost only)
    n = 0
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "params": n}))
"""


def measure(mode: str, base, sft) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(base), str(sft)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", default="smollm2", choices=["demo", "smollm2"])
    args = parser.parse_args()
    base, sft, _, _ = pair_and_prompts(args.pair)
    imports = measure("imports", base, sft)["maxrss_mb"]
    lazy, two = measure("lazy", base, sft), measure("two_models", base, sft)
    model_mb = lazy["params"] * 4 / 2**20
    rows = [
        {
            "approach": "receiver + lazy safetensors donor, each layer patched in turn",
            "peak_rss_mb": lazy["maxrss_mb"],
            "minus_imports_mb": lazy["maxrss_mb"] - imports,
            "in_model_sizes": (lazy["maxrss_mb"] - imports) / model_mb,
        },
        {
            "approach": "two full models (from_pretrained x2)",
            "peak_rss_mb": two["maxrss_mb"],
            "minus_imports_mb": two["maxrss_mb"] - imports,
            "in_model_sizes": (two["maxrss_mb"] - imports) / model_mb,
        },
    ]
    record(
        f"Peak memory of a pair ({args.pair}, {lazy['params'] / 1e6:.1f}M parameters, float32 {model_mb:.0f} MB)",
        rows,
        f"Python + torch + transformers imports alone: {imports:.0f} MB.",
    )


if __name__ == "__main__":
    main()
