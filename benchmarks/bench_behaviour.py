"""Exact behaviour-objective scores: the sweep engine against the plain whole-model loop, on the real
SmolLM2-135M caps fine-tune (docs/method.md, "Behaviour objective and anchor validity").

Same components both ways, in one run: attention and MLP blocks spread over the depth, two heads, the
final norm and the (tied) embedding, and 64 MLP neurons in each of two layers. The plain way
(``behaviour.PlainBackend``) patches each component and runs the whole model; the engine
(``LocalBackend``, as ``wpatch screen --objective behaviour`` runs it) re-runs only the blocks from the
component's own up, stacks variants, and reads the model's head. Prints the times, their ratio, the
time of one plain forward of the prompts (the floor) and the largest score difference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_behaviour.py [--prompts 8] [--tokens 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import case_study as cs
import real_experts as rx
from common import record
from weightpatch.backends import LocalBackend
from weightpatch.behaviour import BehaviourScorer, PlainBackend
from weightpatch.pair import load_pair
from weightpatch.prompts import read_prompt_file
from weightpatch.runner import model_texts

WORK = rx.CACHE / "bench-behaviour"


def components(num_layers: int) -> dict[str, list[str]]:
    """The components timed, by group."""
    last = num_layers - 1
    blocks = [f"L{layer}.{m}" for layer in (0, 8, 16, 24, last) for m in ("attn", "mlp")]
    return {
        "blocks, heads, head pieces": [*blocks, "L4.attn.head0", "L20.attn.head3", "norm.final", "embed"],
        "neurons": [f"L{layer}.mlp.neuron{j}" for layer in (12, last - 1) for j in range(64)],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="response tokens scored per prompt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, experts = rx.build(("caps",))
    _, heldout_file = cs.write_prompt_files("caps", WORK / "prompts")
    records = read_prompt_file(heldout_file)[: args.prompts]
    pair = load_pair(base, experts["caps"])
    texts = model_texts(pair.tokenizer, records)
    scorer = BehaviourScorer(pair, texts, batch_size=args.prompts, max_new_tokens=args.tokens)
    start = time.perf_counter()
    scorer.values(pair.model)
    forward = time.perf_counter() - start
    rows = []
    for group, names in components(pair.space.num_layers).items():
        start = time.perf_counter()
        plain = PlainBackend(scorer).run(names, progress=False).frame.set_index("component")["score"]
        t_plain = time.perf_counter() - start
        start = time.perf_counter()
        with LocalBackend.from_scorer(scorer) as backend:
            engine = backend.run(names, progress=False).frame.set_index("component")["score"]
        t_engine = time.perf_counter() - start
        rows.append(
            {
                "components": f"{group} ({len(names)})",
                "plain (s)": round(t_plain, 1),
                "engine (s)": round(t_engine, 1),
                "plain / engine": round(t_plain / t_engine, 2),
                "engine (forwards)": round(t_engine / forward, 1),
                "max |score diff|": f"{float((engine.reindex(plain.index) - plain).abs().max()):.1e}",
            }
        )
    notes = (
        f"{args.prompts} held-out caps prompts, {args.tokens} response tokens each; one plain forward of "
        f"them: {forward:.2f} s (the floor). float32, 1 torch thread, the engine's duration estimate included."
    )
    record("Behaviour objective: exact scores on the engine vs the plain loop", rows, notes)


if __name__ == "__main__":
    main()
