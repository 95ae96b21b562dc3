"""The pipeline at model scale in bfloat16: every stage's wall time and peak resident memory on the
SmolLM2-135M pair and the Llama-3.2-1B-shaped pair (full donor and LoRA donor), with one plain forward
pass of the same prompts as the floor, and the cost model's prediction of each stage. SmolLM2 pair:
SmolLM2-135M-Instruct and the same base with the 1B pair's fine-tune-like change (no training).

    .venv/bin/python benchmarks/bench_scale.py run            # rows -> ~/.cache/weightpatch-bench/wp32-scale/rows.jsonl
    .venv/bin/python benchmarks/bench_scale.py record         # the model-size table -> RESULTS.md

Each stage runs in its own process (``child``), so its peak RSS (``ru_maxrss``) is its own: load the
pair, then the stage, with the pair passed in. Stages: ``forward`` (one full forward, logits included,
of the prompts in one batch), ``check``, ``anchor`` (model-difference anchor at a fixed layer, half
the prompts train, half held out; no steering), ``first_order`` (every head, neuron and attn/MLP
block), ``local_exact`` (the same components, own block exact), ``exact`` (exact scores of the top 20
by |first-order score|, every kind together), ``sufficiency`` (the top-k heads by first order patched
in, k = 1, 4, 16; no random draws, which would cost 5 forwards per k) and
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
import llama1b_pair
import real_pair

WORK = real_pair.WORK / "wp32-scale"
ROWS = WORK / "rows.jsonl"
ROW_FILES = [ROWS]
PAIRS = ("smollm2", "llama1b", "llama1b-lora")
STAGES = ("forward", "check", "anchor", "first_order", "local_exact", "exact", "sufficiency", "merge")
N_PROMPTS, TOP_K, CURVE_KS, CONTROLS = 8, 20, [1, 4, 16], 0


def smollm2_expert(seed: int, strength: float = 1.0) -> Path:
    """SmolLM2-135M-Instruct plus the 1B pair's fine-tune-like change (low-rank + dense, ``strength`` x
    1e-3 relative) drawn with ``seed``, in the base's float32: the same recipe at both sizes, no training."""
    out = real_pair.WORK / (f"wp32-smollm2-expert{seed}" + (f"-x{strength:g}" if strength != 1 else ""))
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.torch import load_file, save_file

    real_pair.build_base()
    tensors = load_file(real_pair.BASE / "model.safetensors")
    tuned = {n: llama1b_pair.specialized_tensor(n, t.float(), seed, strength).to(t.dtype) for n, t in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    for f in real_pair.BASE.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    save_file(tuned, out / "model.safetensors", metadata={"format": "pt"})
    return out


def pair_paths(name: str) -> dict[str, str]:
    """base, specialized (donor) and the two merge experts of pair ``name``."""
    if name == "smollm2":
        sft = smollm2_expert(1)
        return {"base": str(real_pair.BASE), "specialized": str(sft), "experts": [str(sft), str(smollm2_expert(2))]}
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
    """The top ``TOP_K`` components of every kind together by |first-order score|."""
    import pandas as pd

    frame = pd.read_parquet(run_dir / "scores.parquet")
    frame = frame[frame["method"] == "first_order"]
    return frame.reindex(frame["score"].abs().sort_values(ascending=False).index)["component"].head(TOP_K).tolist()


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
    # the screen stage's anchor validity check (added after the first rows were measured: greedy
    # responses, a behaviour scorer, 6 patched subsets) is its own cost, not the screen's: off
    screening = {**scoring, "validity_k": 0}
    row: dict = {"pair": pair_name, "stage": stage, "params": shape.params, "model_mb": shape.model_bytes / 2**20}
    row["rss_imports_mb"] = current_rss_mb()
    start = time.perf_counter()
    rates = cost.measure_rates(shape, torch.bfloat16)
    row |= {"rate_gflops": rates.flops / 1e9, "rate_melements": rates.elements / 1e6, "rate_copy_gbs": rates.copy / 1e9}
    row["calibration_s"] = time.perf_counter() - start
    pair = None
    if stage != "merge":
        start, cpu = time.perf_counter(), time.process_time()
        pair = open_pair(CheckConfig(**common))
        row["load_s"], row["load_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
        texts = prompts.read_text().splitlines()
        row["tokens"] = [len(pair.tokenizer(t)["input_ids"]) for t in texts]
    start, cpu = time.perf_counter(), time.process_time()
    if stage == "forward":
        batch = encode(pair.tokenizer, texts)
        with torch.no_grad():
            pair.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    elif stage == "check":
        run_check(CheckConfig(**common), pair)
    elif stage == "anchor":
        # measured again: into a fresh directory, the one the other stages read stays as it is
        anchor_dir = runs / "anchor"
        if (anchor_dir / "anchor.json").exists():
            import shutil

            anchor_dir = runs / "anchor-remeasured"
            shutil.rmtree(anchor_dir, ignore_errors=True)
        cfg = AnchorConfig(**common, prompts=prompts, prompt_format="raw", method="model_diff", layer=anchor_layer)
        run_anchor(cfg.model_copy(update={"steering_prompts": 0, "batch_size": N_PROMPTS, "run_dir": anchor_dir}), pair)
    elif stage in ("first_order", "local_exact"):
        names = screen_components(pair.space, anchor_layer)
        row["components"] = len(names)
        cfg = ScreenConfig(**screening, method=stage, components=names, local_exact_blocks=1, run_dir=runs / stage)
        run_screen(cfg, pair)
    elif stage == "exact":
        names = top_components(runs / "first_order")
        row["components"] = len(names)
        row["blocks_rerun"] = sum(anchor_layer - pair.space.first_affected_layer(n) + 1 for n in names)
        run_screen(ScreenConfig(**screening, method="exact", components=names, run_dir=runs / "exact"), pair)
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
    row["stage_s"], row["stage_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
    row["peak_rss_mb"] = rss_mb()
    row["anchor_layer"] = anchor_layer
    return row


def done_rows(files: list[Path] | None = None) -> list[dict]:
    """The rows of ``files`` (default: ``ROWS``); a (pair, stage) measured again in a later file
    replaces the earlier row."""
    rows: dict[tuple[str, str], dict] = {}
    for path in files or [ROWS]:
        for line in path.read_text().splitlines() if path.is_file() else []:
            row = json.loads(line)
            rows[(row["pair"], row["stage"])] = row
    return list(rows.values())


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
            row["measured_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
            with ROWS.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def main() -> None:
    global ROWS, ROW_FILES
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["run", "child", "record"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument(
        "--rows",
        default=str(ROWS),
        help="comma-separated row files: `run` appends to the last and skips what it holds; `record` tables "
        "them all, a later file's row replacing an earlier one of the same pair and stage",
    )
    args = parser.parse_args()
    ROW_FILES = [Path(p).expanduser() for p in args.rows.split(",")]
    ROWS = ROW_FILES[-1]
    if args.what == "child":
        print(json.dumps(child(*args.args)))
    elif args.what == "run":
        run(args.pairs.split(","), args.stages.split(","))
    else:
        record_table()


def workload(row: dict, shape, space_heads: int) -> tuple[str, object]:
    """The cost-model stage and workload of a measured row (what the stage ran)."""
    from weightpatch import cost

    a, tokens = row["anchor_layer"], tuple(row.get("tokens", ()))
    stage = {"sufficiency": "curve"}.get(row["stage"], row["stage"])
    if stage == "local_exact":
        per_layer = {"heads": space_heads, "blocks": 2, "neurons": shape.intermediate, "neuron_layers": 1}
        return stage, cost.Workload(tokens, N_PROMPTS, a, **{k: v * (a + 1) for k, v in per_layer.items()})
    extra = {
        "exact": {"blocks": row.get("components", 0), "exact_depth": row.get("blocks_rerun", 0)},
        "curve": {"curve_points": len(CURVE_KS) * (1 + CONTROLS)},
        "merge": {"experts": 2},
    }.get(stage, {})
    return stage, cost.Workload(tokens, N_PROMPTS, a, **extra)


def record_table() -> None:
    """The model-size table (every pair and stage, with the forward floor and the cost model's
    prediction) and the goals, into RESULTS.md."""
    from weightpatch import cost

    rows = done_rows(ROW_FILES)
    copy_rates = [r["rate_copy_gbs"] * 1e9 for r in rows if "rate_copy_gbs" in r]
    # rows measured before the copy rate was recorded: the mean of the others (or one measured now)
    copy_rate = sum(copy_rates) / len(copy_rates) if copy_rates else cost.Rates.measure_copy()
    table, notes = [], []
    for pair_name in PAIRS:
        mine = {r["stage"]: r for r in rows if r["pair"] == pair_name}
        if not mine:
            continue
        from transformers import AutoConfig

        base = pair_paths(pair_name)["base"]
        shape = cost.model_shape(base, "bfloat16")
        heads = AutoConfig.from_pretrained(base).num_attention_heads
        # the LoRA pair's receiver is the full pair's base: the same forward
        forward = mine.get("forward") or next(r for r in rows if r["pair"] == "llama1b" and r["stage"] == "forward")
        cpu_floor = forward.get("stage_cpu_s")
        for stage in STAGES:
            r = mine.get(stage)
            if r is None:
                continue
            copy = r["rate_copy_gbs"] * 1e9 if "rate_copy_gbs" in r else copy_rate
            rates = cost.Rates(r["rate_gflops"] * 1e9, r["rate_melements"] * 1e6, copy)
            name, work = workload(r, shape, heads)
            p = cost.predict(name, shape, rates, work, r["rss_imports_mb"] * 2**20)
            measured_s = r["stage_s"] + r.get("load_s", 0.0)
            # x_forward on CPU time only (the shared machine's load changes between stages: wall times of
            # different stages are not comparable); NaN for rows measured before CPU time was recorded
            cpu = cpu_floor is not None and "stage_cpu_s" in r
            x_forward = r["stage_cpu_s"] / cpu_floor if cpu else float("nan")
            table.append({
                "pair": pair_name,
                "stage": stage,
                "time_s": r["stage_s"],
                "cpu_s": r.get("stage_cpu_s", float("nan")),
                "load_s": r.get("load_s", 0.0),
                "x_forward": x_forward,
                "peak_rss_mb": r["peak_rss_mb"],
                "x_model": (r["peak_rss_mb"] - r["rss_imports_mb"]) / r["model_mb"],
                "pred_peak_mb": p.peak_bytes / 2**20,
                "mem_err": p.peak_bytes / 2**20 / r["peak_rss_mb"] - 1,
                "pred_s": p.seconds,
                "time_err": p.seconds / measured_s - 1,
                "measured_utc": r.get("measured_utc", "2026-12-03 <=18:46"),
            })  # fmt: skip
        if "exact" in mine:
            e = mine["exact"]
            fraction = (e["blocks_rerun"] + e["anchor_layer"] + 1) / shape.layers  # in forward passes
            got = next(t["x_forward"] for t in table if t["pair"] == pair_name and t["stage"] == "exact")
            notes.append(
                f"{pair_name}: exact top-{TOP_K} ({e['blocks_rerun']} blocks re-run) = {got:.1f} forward passes vs "
                f"the goal k x depth fraction + cached prefix = {fraction:.1f}"
            )
    record(
        "The pipeline at model size in bfloat16 (SmolLM2-135M vs Llama-3.2-1B-shaped; full and LoRA donor)",
        table,
        "Each stage in a fresh process, one torch thread, on the shared 2-core machine (other jobs running: the "
        "absolute times are slow, ratios within one pair are the figures). time_s: the stage after loading (wall), "
        "cpu_s: its CPU time; x_forward: its CPU time over that of one plain forward (logits included) of the same "
        "8 prompts (nan: a row measured before CPU time was recorded); x_model: (peak RSS - "
        "RSS after imports) / the model's bfloat16 size; pred_*: weightpatch.cost's prediction from the config, "
        "token counts and the rates measured in the same process just before the stage (load included in "
        "pred_s and in the time_err comparison). " + "; ".join(notes) + ".",
    )


if __name__ == "__main__":
    main()
