"""Where the anchor and the behaviour put the capability, on the real caps fine-tune of the case study
(docs/method.md, "Behaviour objective and anchor validity").

For each anchor layer given (default: 16, the case study's searched layer, and 24), on the SmolLM2-135M
caps expert of benchmarks/real_experts.py and the case study's held-out prompts (16 of them):
an anchor at that layer (instruction method), a first-order screen of layers, modules and heads under
each objective (anchor, behaviour) with the anchor validity check (top-16 attention/MLP blocks), and
from the behaviour run the rank agreement and the curves in both currencies. Prints and appends to
benchmarks/RESULTS.md: the validity verdict per (layer, objective), the share of |first-order score|
of the attention/MLP blocks above and below the anchor under each objective, and the agreement.

    .venv/bin/python benchmarks/anchor_vs_behaviour.py [--layers 16 24]

Cached and resumable: run directories under ~/.cache/weightpatch-bench/anchor-vs-behaviour.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
import case_study as cs
import real_experts as rx
from common import record
from weightpatch.config import AnchorConfig, ScreenConfig
from weightpatch.pipeline import open_pair, run_anchor, run_screen
from weightpatch.rundir import RunDir

WORK = rx.CACHE / "anchor-vs-behaviour"


def block_mass(scores: pd.DataFrame, anchor_layer: int) -> dict[str, float]:
    """Share of the summed |first-order score| of the attention/MLP blocks at or below the anchor
    layer, and the layer holding the most."""
    blocks = scores[(scores["kind"] == "module") & scores["component"].str.fullmatch(r"L\d+\.(attn|mlp)")]
    mass = blocks.assign(a=blocks["score"].abs()).groupby("layer")["a"].sum()
    return {"below_share": float(mass[mass.index <= anchor_layer].sum() / mass.sum()), "peak_layer": int(mass.idxmax())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 24])
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, experts = rx.build(("caps",))
    anchor_file, heldout_file = cs.write_prompt_files("caps", WORK / "prompts")
    shared = {"base": str(base), "specialized": str(experts["caps"]), "seed": 0, "progress": False}
    pair = None
    rows = []
    for layer in args.layers:
        folder = WORK / f"layer{layer}"
        acfg = AnchorConfig(
            prompts=anchor_file,
            heldout=heldout_file,
            run_dir=folder / "anchor",
            layer=layer,
            steering_prompts=0,
            **shared,
        )
        pair = pair or open_pair(acfg)
        run_anchor(acfg, pair)
        for objective in ("anchor", "behaviour"):
            start = time.perf_counter()
            cfg = ScreenConfig(
                prompts=heldout_file, anchor=acfg.run_path / "anchor", run_dir=folder / objective,
                method="first_order", kinds=["layer", "module", "head"], objective=objective,
                max_prompts=args.prompts, first_order_stderr=False, validity_k=16, **shared,
            )  # fmt: skip
            result = run_screen(cfg, pair)
            run = RunDir(result.run_dir)
            validity = run.load_table("anchor_validity").set_index("selection")
            mass = block_mass(result.scores.frame, layer)
            row = {
                "anchor layer": layer,
                "ranked by": objective,
                "top-16 anchor": float(validity.loc["top", "anchor"]),
                "top-16 behaviour": float(validity.loc["top", "behaviour"]),
                "checker top-16": float(validity.loc["top", "metric"]),
                "checker base": float(validity.loc["base", "metric"]),
                "checker sft": float(validity.loc["specialized", "metric"]),
                "block mass <= anchor": mass["below_share"],
                "peak block layer": mass["peak_layer"],
                "verdict": result.validity.status if result.validity else "skipped",
                "seconds": round(time.perf_counter() - start),
            }
            row["spearman module/head"] = "-"  # written by the behaviour run (it scores both objectives)
            if objective == "behaviour":
                agree = run.load_table("objective_agreement")
                per_kind = agree[agree["layer"].isna()].set_index("kind")
                row["spearman module/head"] = (
                    f"{per_kind.loc['module', 'spearman']:.2f}/{per_kind.loc['head', 'spearman']:.2f}"
                )
            rows.append(row)
            print(row, flush=True)
    record(
        "Anchor vs behaviour on the caps fine-tune (SmolLM2-135M, first order, validity check top-16 blocks)",
        rows,
        notes="",
    )


if __name__ == "__main__":
    main()
