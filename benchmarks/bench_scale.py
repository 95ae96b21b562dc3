"""The pipeline at model scale in bfloat16: every stage's wall time and peak resident memory on the
SmolLM2-135M pair and the Llama-3.2-1B-shaped pair (full donor and LoRA donor), with one plain forward
pass of the same prompts as the floor, and the cost model's prediction of each stage.

    .venv/bin/python benchmarks/bench_scale.py run            # rows -> ~/.cache/weightpatch-bench/wp32-scale/rows.jsonl
    .venv/bin/python benchmarks/bench_scale.py record         # the model-size table -> RESULTS.md

Each stage runs in its own process (``child``), so its peak RSS (``ru_maxrss``) is its own: load the
pair, then the stage, with the pair passed in. Stages: ``forward`` (one full forward, logits included,
of the prompts in one batch), ``check``, ``anchor`` (model-difference anchor at a fixed layer, half
the prompts train, half held out; no steering), ``first_order`` (every head, neuron and attn/MLP
block), ``local_exact`` (the same components, own block exact), ``exact`` (exact scores of the top 20
of each kind by first order), ``sufficiency`` (top-k heads vs 5 random draws, k = 4, 16) and
``merge`` (task arithmetic of 2 experts, streamed to disk). Rows are appended as each stage finishes
and a stage already in the file is not re-run. Before each stage the child measures this machine's
rates (:func:`weightpatch.cost.measure_rates`) and stores them with the token counts, so ``record``
prints the prediction of the same moment.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import record

sys.path.insert(0, str(Path(__file__).parent))
import llama1b_pair  # noqa: E402
import real_pair  # noqa: E402

WORK = real_pair.WORK / "wp32-scale"
ROWS = WORK / "rows.jsonl"
PAIRS = ("smollm2", "llama1b", "llama1b-lora")
STAGES = ("forward", "check", "anchor", "first_order", "local_exact", "exact", "sufficiency", "merge")
N_PROMPTS, TOP_K, CURVE_KS, CONTROLS = 8, 20, [4, 16], 5
SMOLLM2_EXPERT2 = real_pair.WORK / "wp32-smollm2-expert2"


def smollm2_expert2() -> Path:
    """A second SmolLM2 expert for the merge: the 1B pair's fine-tune-like recipe on the SmolLM2 base."""
    if (SMOLLM2_EXPERT2 / "model.safetensors").is_file():
        return SMOLLM2_EXPERT2
    from safetensors.torch import load_file, save_file

    tensors = load_file(real_pair.BASE / "model.safetensors")
    tuned = {n: llama1b_pair.specialized_tensor(n, t.float(), seed=2).to(t.dtype) for n, t in tensors.items()}
    SMOLLM2_EXPERT2.mkdir(parents=True, exist_ok=True)
    save_file(tuned, SMOLLM2_EXPERT2 / "model.safetensors", metadata={"format": "pt"})
    for f in real_pair.BASE.iterdir():
        if f.suffix != ".safetensors":
            (SMOLLM2_EXPERT2 / f.name).write_bytes(f.read_bytes())
    return SMOLLM2_EXPERT2


def pair_paths(name: str) -> dict[str, str]:
    """base, specialized (donor) and the two merge experts of pair ``name``."""
    if name == "smollm2":
        base, sft = real_pair.build()
        return {"base": str(base), "specialized": str(sft), "experts": [str(sft), str(smollm2_expert2())]}
    dirs = llama1b_pair.build()
    donor = dirs["lora"] if name == "llama1b-lora" else dirs["sft"]
    return {"base": str(dirs["base"]), "specialized": str(donor), "experts": [str(donor), str(dirs["expert2"])]}


def prompt_file() -> Path:
    path = WORK / "prompts.txt"
    WORK.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(real_pair.prompts(False)[:N_PROMPTS]) + "\n")
    return path


def rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def screen_components(space, anchor_layer: int) -> list[str]:
    """Every head, neuron and attn/MLP block at or below the anchor (those above cannot move it)."""
    names = [str(c) for c in space.components(kinds=("head", "neuron"), layers=range(anchor_layer + 1))]
    blocks = [
        c for c in space.components(kinds=("module",), layers=range(anchor_layer + 1)) if c.module in ("attn", "mlp")
    ]
    return names + [str(c) for c in blocks]


def top_components(run_dir: Path) -> list[str]:
    """The top ``TOP_K`` of each kind (head, attn/MLP block, neuron) by |first-order score|."""
    import pandas as pd

    frame = pd.read_parquet(run_dir / "scores.parquet")
    frame = frame[frame["method"] == "first_order"]
    names: list[str] = []
    for _, group in frame.groupby("kind"):
        names += (
            group.reindex(group["score"].abs().sort_values(ascending=False).index)["component"].head(TOP_K).tolist()
        )
    return names


def child(pair_name: str, stage: str) -> dict:
    """Run one stage in this process; its row."""
    torch.set_num_threads(1)
    from weightpatch import cost
    from weightpatch.config import AnchorConfig, CheckConfig, MergeStageConfig, ScreenConfig, TraceConfig
    from weightpatch.pipeline import open_pair, run_anchor, run_check, run_merge, run_screen
    from weightpatch.pipeline.inputs import scoring_run
    from weightpatch.results import ScoreTable
    from weightpatch.runner import encode
    from weightpatch.validation import sufficiency_curve

    paths = pair_paths(pair_name)
    runs = WORK / pair_name
    prompts = prompt_file()
    shape = cost.model_shape(paths["base"], "bfloat16")
    anchor_layer = shape.layers // 2
    common = {"base": paths["base"], "specialized": paths["specialized"], "dtype": "bfloat16", "progress": False}
    scoring = {**common, "prompts": prompts, "prompt_format": "raw", "batch_size": N_PROMPTS}
    scoring |= {"anchor": runs / "anchor" / "anchor", "first_order_stderr": False}
    row: dict = {"pair": pair_name, "stage": stage, "params": shape.params, "model_mb": shape.model_bytes / 2**20}
    row["rss_imports_mb"] = current_rss_mb()
    start = time.perf_counter()
    rates = cost.measure_rates(shape, torch.bfloat16)
    row |= {"rate_gflops": rates.flops / 1e9, "rate_melements": rates.elements / 1e6, "rate_copy_gbs": rates.copy / 1e9}
    row["calibration_s"] = time.perf_counter() - start
    pair = None
    if stage != "merge":
        start = time.perf_counter()
        pair = open_pair(CheckConfig(**common))
        row["load_s"] = time.perf_counter() - start
        texts = prompts.read_text().splitlines()
        row["tokens"] = [len(pair.tokenizer(t)["input_ids"]) for t in texts]
    start = time.perf_counter()
    if stage == "forward":
        batch = encode(pair.tokenizer, texts)
        with torch.no_grad():
            pair.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    elif stage == "check":
        run_check(CheckConfig(**common), pair)
    elif stage == "anchor":
        cfg = AnchorConfig(**common, prompts=prompts, prompt_format="raw", method="model_diff", layer=anchor_layer)
        run_anchor(
            cfg.model_copy(update={"steering_prompts": 0, "batch_size": N_PROMPTS, "run_dir": runs / "anchor"}), pair
        )
    elif stage in ("first_order", "local_exact"):
        names = screen_components(pair.space, anchor_layer)
        row["components"] = len(names)
        cfg = ScreenConfig(**scoring, method=stage, components=names, local_exact_blocks=1, run_dir=runs / stage)
        run_screen(cfg, pair)
    elif stage == "exact":
        names = top_components(runs / "first_order")
        row["components"] = len(names)
        row["blocks_rerun"] = sum(anchor_layer - pair.space.first_affected_layer(n) + 1 for n in names)
        run_screen(ScreenConfig(**scoring, method="exact", components=names, run_dir=runs / "exact"), pair)
    elif stage == "sufficiency":
        import pandas as pd

        table = ScoreTable(pd.read_parquet(runs / "first_order" / "scores.parquet"))
        with scoring_run(TraceConfig(**scoring, run_dir=runs / "sufficiency"), "trace", pair) as (_, scorer):
            curve = sufficiency_curve(scorer, table, ks=CURVE_KS, method="first_order", kind="head", controls=CONTROLS)
        row["recovery"] = curve["recovery"].tolist()
    elif stage == "merge":
        out = WORK / f"merged-{pair_name}"
        run_merge(
            MergeStageConfig(base=paths["base"], experts=paths["experts"], output=out, overwrite=True, progress=False)
        )
    row["stage_s"] = time.perf_counter() - start
    row["peak_rss_mb"] = rss_mb()
    row["anchor_layer"] = anchor_layer
    return row


def done_rows() -> list[dict]:
    return [json.loads(line) for line in ROWS.read_text().splitlines()] if ROWS.is_file() else []


def run(pairs: list[str], stages: list[str]) -> None:
    """Each (pair, stage) not yet in ``ROWS`` in a fresh process, appending its row."""
    for pair_name in pairs:
        pair_paths(pair_name)  # build (cached) before timing anything
        for stage in stages:
            if any(r["pair"] == pair_name and r["stage"] == stage for r in done_rows()):
                continue
            print(f"{pair_name} {stage} ...", flush=True)
            start = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "child", pair_name, stage], capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:], flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["process_s"] = time.perf_counter() - start
            with ROWS.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["run", "child", "record"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--stages", default=",".join(STAGES))
    args = parser.parse_args()
    if args.what == "child":
        print(json.dumps(child(*args.args)))
    elif args.what == "run":
        run(args.pairs.split(","), args.stages.split(","))
    else:
        record_table()


def record_table() -> None:
    raise NotImplementedError


if __name__ == "__main__":
    main()
