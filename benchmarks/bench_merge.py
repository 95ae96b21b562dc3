"""Merge benchmark: (a) the merge report on the demo base + two experts, (b) peak memory of a streamed
merge vs loading every model and merging in memory, on a 135M-parameter model, (c) ``--part real``: the
merge table on real SmolLM2-135M experts (``real_experts.py``), every method with lambda chosen on
validation topics and reported on held-out topics.

    .venv/bin/python benchmarks/bench_merge.py            # both parts
    .venv/bin/python benchmarks/bench_merge.py --part table
    .venv/bin/python benchmarks/bench_merge.py --part memory
    .venv/bin/python benchmarks/bench_merge.py --part real --threads 2 [--combos caps+quotes+end]

(a) experts: the shipped *format* expert (``demo.paths().specialized``, six IFEval formats) and the
*end-phrase* expert (``startend:end_checker``) that :mod:`weightpatch.demo.expert` fine-tunes from the
same base into ``benchmarks/_work/demo-end-expert`` (built on first use). Each capability has its own
anchor (``model_diff`` by default, ``--anchor-method instruction`` for instruction vectors; layer searched
on the anchor split vs the held-out split of its prompts),
its own Weight Patching scores (screen-then-verify over heads and neurons, exact scores of the verified
top 20 per kind) and its own checker (IFEval strict, prompt level, greedy).

(b) base = SmolLM2-135M (``real_pair.build()``), experts = the caps fine-tune and a *synthetic* expert
(base + Gaussian noise of 1% of each tensor's std, for the memory measurement only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import record

HERE = Path(__file__).parent
WORK = HERE / "_work"
END_EXPERT = WORK / "demo-end-expert"


def end_expert() -> tuple[Path, dict]:
    from weightpatch.demo.expert import train_expert

    if not (END_EXPERT / "model.safetensors").exists():
        train_expert(END_EXPERT, seed=0)
    return END_EXPERT, json.loads((END_EXPERT / "training.json").read_text())


def merge_table(args) -> None:
    from weightpatch import demo
    from weightpatch.demo import expert as end
    from weightpatch.merging.evaluate import build_capability, capability_scores, merge_report, wide_table

    torch.set_num_threads(args.threads)
    paths = demo.paths()
    end_dir, training = end_expert()
    fmt_anchor, fmt_held = demo.prompts("anchor"), demo.prompts("heldout")
    end_anchor, end_held = end.prompts("anchor"), end.prompts("heldout")
    fmt_records = fmt_held[:: args.stride]
    t0 = time.perf_counter()
    caps = [
        build_capability(
            "format",
            paths.base,
            paths.specialized,
            [r.prompt for r in fmt_anchor],
            [r.prompt_without_instruction for r in fmt_anchor],
            heldout_with=[r.prompt for r in fmt_held],
            heldout_without=[r.prompt_without_instruction for r in fmt_held],
            score_prompts=[r.prompt for r in fmt_records],
            records=fmt_records,
            method=args.anchor_method,
        ),
        build_capability(
            "end_phrase",
            paths.base,
            end_dir,
            [r.prompt for r in end_anchor],
            [r.prompt_without_instruction for r in end_anchor],
            heldout_with=[r.prompt for r in end_held],
            heldout_without=[r.prompt_without_instruction for r in end_held],
            score_prompts=[r.prompt for r in end_held],
            records=end_held,
            method=args.anchor_method,
        ),
    ]
    t_anchor = time.perf_counter() - t0
    scores = [capability_scores(c, kinds=("head", "neuron"), top_k=20) for c in caps]
    t_scores = time.perf_counter() - t0 - t_anchor
    from weightpatch.merging import MergeConfig, owner_takes_top
    from weightpatch.merging.evaluate import default_mergers
    from weightpatch.merging.mechanism import component_space_for_checkpoint

    mergers = default_mergers(paths.base, scores, top_k=args.top_k)
    space = component_space_for_checkpoint(paths.base)
    mergers["owner_blend"] = owner_takes_top(space, scores, top_k=args.top_k, conflict="blend", others=0.5)
    mergers["localize_stitch"] = MergeConfig("localize_stitch", density=0.1)
    table = merge_report(
        caps, paths.base, WORK / "demo-merges", mergers=mergers, progress=lambda s: print(s, flush=True)
    )
    t_all = time.perf_counter() - t0
    wide = wide_table(table)
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in wide.to_dict("records")]
    layers = ", ".join(f"{c.name}: L{c.scorer.layer}" for c in caps)
    top = "; ".join(
        f"{c.name}: " + ", ".join(s.sort_values("score", ascending=False)["component"][:5])
        for c, s in zip(caps, scores, strict=True)
    )
    record(
        "Merge report: demo base + format expert + end-phrase expert",
        rows,
        f"Columns per capability: anchor recovery (fraction of that expert's own anchor gap reached, "
        f"mean over its held-out prompts), strict prompt-level accuracy of greedy generations "
        f"({len(fmt_records)} format prompts, {len(end_held)} end-phrase prompts), KL(expert || model) per "
        f"response token on the expert's greedy responses. Anchors ({args.anchor_method}, layer searched): {layers}. "
        f"Merges: task arithmetic "
        f"(weights 1, lambda 1), TIES (density 0.5), DARE-TIES (drop 0.5, seed 0), owner_takes_top (top "
        f"{args.top_k} of each expert's verified head/neuron scores, task arithmetic elsewhere), "
        f"score_weighted (task arithmetic, per-entry weights max(0.3, normalized score)), owner_blend "
        f"(owner_takes_top with conflict=blend, others=0.5), localize_stitch (density 0.1). Top components: "
        f"{top}. End-phrase expert: {training['hyperparameters']['steps']} steps, "
        f"{training['total_seconds']} s training ({training['torch_threads']} threads). Times: anchors "
        f"{t_anchor:.0f} s, scores {t_scores:.0f} s, total {t_all:.0f} s.",
    )


CHILD = r"""
import json, resource, sys, torch
mode, out, base, *experts = sys.argv[1:]
torch.set_num_threads(1)
from weightpatch.merging import MergeConfig, merge_checkpoints
cfg = MergeConfig("ties", density=0.5)
if mode.startswith("streamed"):
    merge_checkpoints(base, experts, out, cfg, overwrite=True, max_shard_size=mode.split(":")[1])
elif mode == "in_memory":
    from transformers import AutoModelForCausalLM
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (base, *experts)]
    states = [m.state_dict() for m in models]
    merged = {n: cfg.merge_tensor(n, t, [s[n] for s in states[1:]]) for n, t in states[0].items()}
    models[0].load_state_dict(merged)
    models[0].save_pretrained(out)
else:
    import transformers, weightpatch.merging  # noqa: F401  (import cost only)
# VmHWM, not ru_maxrss: on Linux ru_maxrss starts at the parent's RSS at fork time (folded in at exec)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"maxrss_mb": int(hwm) / 1024, "ru_maxrss_mb": ru}))
"""


def synthetic_expert(base: Path, out: Path, rel: float = 0.01, seed: int = 0) -> Path:
    """base + N(0, (rel * std(tensor))^2) per floating tensor, saved as safetensors (memory benchmark only)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            t = f.get_tensor(name)
            if t.dtype.is_floating_point and t.numel() > 1:
                t = t + rel * t.float().std() * torch.randn(t.shape, generator=g).to(t.dtype)
            tensors[name] = t.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out / f.name)
    (out / "SYNTHETIC.txt").write_text(f"base + {rel} * std * N(0,1) per tensor, seed {seed}: memory benchmark only\n")
    return out


def memory(args) -> None:
    import shutil

    sys.path.insert(0, str(HERE))
    import real_pair

    if (real_pair.SPECIALIZED / "model.safetensors").exists() or args.build_caps:
        base, caps = real_pair.build()
        second = "the caps fine-tune"
    else:  # the caps expert is not built (or another process is building it): a second synthetic expert
        base = real_pair.BASE
        if not (base / "model.safetensors").exists():
            real_pair.build_base()
        caps = synthetic_expert(base, WORK / "smollm2-synthetic-1", seed=1)
        second = "a second synthetic expert (seed 1; the caps fine-tune was not built)"
    synth = synthetic_expert(base, WORK / "smollm2-synthetic")
    out = WORK / "merge-memory-out"
    n_params = 0
    from weightpatch.merging import Checkpoint

    for s in Checkpoint(base).shapes.values():
        n = 1
        for d in s:
            n *= d
        n_params += n
    model_mb = n_params * 4 / 2**20

    def run(mode: str) -> dict:
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-c", CHILD, mode, str(out), str(base), str(caps), str(synth)],
            capture_output=True,
            text=True,
            check=True,
        )
        shutil.rmtree(out, ignore_errors=True)
        return {**json.loads(res.stdout.strip().splitlines()[-1]), "seconds": time.perf_counter() - t0}

    imports = run("imports")["maxrss_mb"]
    rows = []
    for mode, label in (
        ("streamed:100MB", "streamed merge_checkpoints, 100 MB output shards"),
        ("streamed:5GB", "streamed merge_checkpoints, one output shard (default 5GB limit)"),
        ("in_memory", "3 x from_pretrained, merge state dicts in memory, save_pretrained"),
    ):
        r = run(mode)
        rows.append(
            {
                "approach": label,
                "peak_rss_mb": round(r["maxrss_mb"]),
                "minus_imports_mb": round(r["maxrss_mb"] - imports),
                "in_model_sizes": round((r["maxrss_mb"] - imports) / model_mb, 2),
                "seconds": round(r["seconds"], 1),
            }
        )
    record(
        f"Peak memory of a 3-model TIES merge (SmolLM2, {n_params / 1e6:.1f}M parameters, float32 {model_mb:.0f} MB)",
        rows,
        f"Base + 2 experts ({second} and a synthetic base + 1% noise expert, memory only); each "
        f"approach in a fresh process, peak RSS = VmHWM of the process (file-backed mmap pages of the inputs count "
        f"while mapped). "
        f"Imports alone: {imports:.0f} MB.",
    )


COMBOS = (("caps", "quotes"), ("caps", "quotes", "end"), ("caps", "end"), ("quotes", "end"))


def _in_memory_merge(model, base_state: dict, expert_states: list[dict], merger) -> None:
    """Load ``merger``'s merge of the experts onto the base into ``model`` (no disk)."""
    merged = {
        n: (merger.merge_tensor(n, b, [e[n] for e in expert_states]) if b.dtype.is_floating_point else b)
        for n, b in base_state.items()
    }
    missing, unexpected = model.load_state_dict(merged, strict=False)
    assert not unexpected and all(m == "lm_head.weight" for m in missing), (missing, unexpected)


def _perplexity(model, tok, prompts: list[str], responses: list[str]) -> float:
    """exp(mean NLL) of ``responses`` (the base's own greedy text) after their rendered prompts."""
    from weightpatch.runner import render_prompts

    nll, count = 0.0, 0
    with torch.no_grad():
        for text, resp in zip(render_prompts(tok, prompts), responses, strict=True):
            p = tok(text, add_special_tokens=False)["input_ids"]
            r = tok(resp, add_special_tokens=False)["input_ids"]
            if not r:
                continue
            ids = torch.tensor([p + r])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1 : -1].float(), -1)
            nll -= float(logp.gather(1, torch.tensor(r)[:, None]).sum())
            count += len(r)
    return float(torch.exp(torch.tensor(nll / max(count, 1))))


def _real_capabilities(rx, base: Path, experts: dict[str, Path], top_k: int):
    """Per skill: the held-out capability (anchor searched on the validation topics, anchor recovery,
    strict accuracy and KL to the expert measured on the held-out topics), the scorer of that anchor on
    the validation topics (the tie-break of the settings' choice) and the expert's Weight Patching scores
    on the validation topics (screen-then-verify, heads and neurons; cached next to
    the expert as ``wp-scores.csv``; modules as ``wp-modules.csv``)."""
    import pandas as pd

    from weightpatch.merging.evaluate import build_capability
    from weightpatch.runner import render_prompts
    from weightpatch.scoring import AnchorScorer
    from weightpatch.screening.verify import screen_then_verify

    caps, scores, validation_scorers = {}, {}, {}
    for skill, expert in experts.items():
        spec = rx.SKILLS[skill]
        held = rx.prompts(rx.HELDOUT, spec["instruction"])
        kwargs = [spec.get("kwargs", {})]
        records = [{"prompt": p, "instruction_id_list": [spec["instruction_id"]], "kwargs": kwargs} for p in held]
        cap = build_capability(
            skill,
            base,
            expert,
            rx.prompts(rx.TRAIN, spec["instruction"]),
            rx.prompts(rx.TRAIN, None),
            heldout_with=rx.prompts(rx.VALIDATION, spec["instruction"]),
            heldout_without=rx.prompts(rx.VALIDATION, None),
            score_prompts=held,
            records=records,
            max_new_tokens=48,
        )
        pair, anchor = cap.scorer.pair, cap.scorer.anchor
        texts = render_prompts(pair.tokenizer, rx.prompts(rx.VALIDATION, spec["instruction"]))
        validation_scorers[skill] = AnchorScorer(pair, anchor, texts)
        scores[skill] = {}
        for label, kinds, cache in (
            ("fine", ("head", "neuron"), "wp-scores.csv"),
            ("module", ("module",), "wp-modules.csv"),
        ):
            if not (expert / cache).exists():
                table, _ = screen_then_verify(validation_scorers[skill], kinds=kinds, top_k=top_k)
                table.select("exact").to_pandas()[["component", "score"]].to_csv(expert / cache, index=False)
            scores[skill][label] = pd.read_csv(expert / cache)
        caps[skill] = cap
    return caps, scores, validation_scorers


WEIGHT_LEVELS = (0.25, 1.0)  # per-expert task-arithmetic weights tried (every combination)


def _method_grids(args, space, scores: list[dict], n: int, ta_name: str, ta) -> dict[str, dict[str, object]]:
    """Every method's grid of settings for a merge of ``n`` experts (``ta``: the task arithmetic
    whose lambda was chosen on validation; the head/neuron rules are built on it)."""
    import itertools

    from weightpatch.merging import MergeConfig, owner_takes_top, score_weighted

    fine, modules = [s["fine"] for s in scores], [s["module"] for s in scores]
    weight_grid = [w for w in itertools.product(WEIGHT_LEVELS, repeat=n) if max(w) == 1.0]
    return {
        "task_arithmetic": {ta_name: ta},
        "task_arithmetic_weighted": {
            f"task_arithmetic(weights={list(w)})": MergeConfig(weights=w) for w in weight_grid
        },
        "ties": {f"ties(d={d})": MergeConfig("ties", density=d) for d in (0.5, 0.2)},
        "dare_ties": {f"dare_ties(p={p})": MergeConfig("dare_ties", drop_rate=p) for p in (0.5, 0.8)},
        "localize_stitch": {f"localize_stitch(d={d})": MergeConfig("localize_stitch", density=d) for d in (0.1, 0.05)},
        "owner_takes_top": {
            f"owner_takes_top(k={k},{ta_name})": owner_takes_top(space, fine, top_k=k, standard=ta)
            for k in (args.top_k, 2 * args.top_k)
        },
        "owner_blend": {
            f"owner_blend(k={args.top_k},others={o},{ta_name})": owner_takes_top(
                space, fine, top_k=args.top_k, standard=ta, conflict="blend", others=o
            )
            for o in (0.5, 1.0)
        },
        "score_weighted": {
            f"score_weighted(floor={f},{ta_name})": score_weighted(space, fine, floor=f, standard=ta)
            for f in (0.3, 0.7)
        },
        # each expert's full delta on its top-k modules (the best-scored owner where two own one),
        # the other experts' deltas there and every delta elsewhere at their per-expert weights
        "owner_local": {
            f"owner_takes_top(k={k} modules,others=1,task_arithmetic(weights={list(w)}))": owner_takes_top(
                space, modules, top_k=k, standard=MergeConfig(weights=w), others=1.0
            )
            for k in args.owner_local_k
            for w in weight_grid
            if min(w) < 1.0  # all weights 1: task arithmetic but on shared modules (not a separate setting)
        },
    }


def real_table(args) -> None:
    """The merge table on real SmolLM2-135M experts (benchmarks/real_experts.py): per combination of
    experts, every method with its settings chosen on the validation topics (mean strict accuracy,
    then the lower false-format rate), reported on held-out topics."""
    sys.path.insert(0, str(HERE))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import real_experts as rx
    from weightpatch.merging import Checkpoint, MergeConfig
    from weightpatch.merging.evaluate import evaluate_model
    from weightpatch.merging.mechanism import component_space_for_checkpoint

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base, experts = rx.build()
    tok = AutoTokenizer.from_pretrained(base)
    space = component_space_for_checkpoint(base)
    caps, scores, validation_scorers = _real_capabilities(rx, base, experts, 2 * args.top_k)
    t_scores = time.perf_counter() - t0
    base_ckpt = Checkpoint(base)
    base_state = {n: base_ckpt.get(n) for n in base_ckpt.names}
    states = {s: {n: Checkpoint(p).get(n) for n in base_ckpt.names} for s, p in experts.items()}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    plain_held = rx.prompts(rx.HELDOUT, None)
    base_text = rx.generate(model, tok, plain_held, max_new_tokens=48)

    def false_rates(skills, topics) -> dict[str, float]:
        plain = rx.generate(model, tok, rx.prompts(topics, None), max_new_tokens=48)
        return {s: sum(map(rx.SKILLS[s]["check"], plain)) / len(plain) for s in skills}

    def validation(skills) -> tuple[float, float, float]:
        """(mean strict accuracy, worst false-format rate, mean anchor recovery) on the validation topics."""
        accs, recoveries = [], []
        for s in skills:
            asked = rx.generate(model, tok, rx.prompts(rx.VALIDATION, rx.SKILLS[s]["instruction"]), max_new_tokens=48)
            accs.append(sum(map(rx.SKILLS[s]["check"], asked)) / len(asked))
            with torch.no_grad():
                scorer = validation_scorers[s]
                recoveries.append(scorer.effect(scorer.anchor_scores(model)).mean)
        n = len(skills)
        return sum(accs) / n, max(false_rates(skills, rx.VALIDATION).values()), sum(recoveries) / n

    measured: dict[str, dict] = {}  # the base's and each expert's metrics, measured once for every combination

    def heldout(skills, name: str | None = None) -> dict:
        """Held-out metrics of the loaded model; ``name`` (base, expert:...) caches them per skill."""
        cache = measured.setdefault(name, {}) if name else {}
        for s in skills:
            if s not in cache:
                got = evaluate_model(model, caps[s])
                cache[s] = {f"{s}:strict": got["strict_accuracy"], f"{s}:recovery": got["anchor_recovery"]}
                cache[s][f"{s}:kl"] = got["kl_to_expert"]
        missing = [s for s in skills if f"false:{s}" not in cache]
        if missing:
            cache.update({f"false:{s}": v for s, v in false_rates(missing, rx.HELDOUT).items()})
        if "ppl" not in cache:
            cache["ppl"] = _perplexity(model, tok, plain_held, base_text)
        row = {k: v for s in skills for k, v in cache[s].items()}
        row["mean_strict"] = sum(cache[s][f"{s}:strict"] for s in skills) / len(skills)
        row["false_format"] = max(cache[f"false:{s}"] for s in skills)
        row["base_text_ppl"] = cache["ppl"]
        return row

    def choose(grid: dict[str, object], skills) -> tuple[str, object, str]:
        """The grid entry with the best validation: mean strict accuracy, then the lower false-format
        rate, then the mean anchor recovery (greedy strict accuracy on 12 prompts per skill ties often)."""
        results = {}
        for name, merger in grid.items():
            _in_memory_merge(model, base_state, [states[s] for s in skills], merger)
            results[name] = validation(skills)
            print("validation", "+".join(skills), name, results[name], flush=True)
        best = max(results, key=lambda n: (results[n][0], -results[n][1], results[n][2]))
        return best, grid[best], ", ".join(f"{n}: {v[0]:.2f}/{v[1]:.2f}/{v[2]:.2f}" for n, v in results.items())

    fixed = {m: int(i) for m, i in (kv.split("=") for kv in args.fixed.split(",") if kv)}
    combos = COMBOS if args.combos == "all" else tuple(tuple(c.split("+")) for c in args.combos.split(","))
    rows, chosen = [], []
    for combo in combos:
        label = "+".join(combo)
        ta_name, ta, _ = choose({f"task_arithmetic(lam={v})": MergeConfig(lam=v) for v in args.lams}, combo)
        grids = _method_grids(args, space, [scores[s] for s in combo], len(combo), ta_name, ta)
        if args.methods != "all":
            grids = {m: g for m, g in grids.items() if m in args.methods.split(",")}
        for name in ("base", *(f"expert:{s}" for s in combo)):
            model.load_state_dict(base_state if name == "base" else states[name.split(":")[1]], strict=False)
            rows.append({"experts": label, "model": name, **heldout(combo, name)})
            print(rows[-1], flush=True)
        if args.grid == "lambda":  # only lambda tuned: every other method at its first (conventional) setting
            grids = {method: dict([next(iter(grid.items()))]) for method, grid in grids.items()}
        for method, position in fixed.items():  # a setting chosen before (on another combination's validation)
            if method in grids:
                grids[method] = dict([list(grids[method].items())[position]])
        for method, grid in grids.items():
            name, merger, tried = choose(grid, combo) if len(grid) > 1 else (*next(iter(grid.items())), "")
            chosen.append(
                f"{label} {method}: {name}"
                + (f" (validation mean strict/false-format/recovery: {tried})" if tried else "")
            )
            _in_memory_merge(model, base_state, [states[s] for s in combo], merger)
            rows.append({"experts": label, "model": name, **heldout(combo)})
            print(rows[-1], flush=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "-") for k in keys} for r in rows]
    record(
        "Merge table on real experts (SmolLM2-135M-Instruct, one IFEval format each)",
        rows,
        f"Experts: benchmarks/real_experts.py. Held-out: {len(rx.HELDOUT)} topics never trained on x "
        f"{len(rx.TEMPLATES)} phrasings. strict = IFEval strict accuracy of greedy responses (48 new tokens) with "
        f"the skill's instruction; recovery = anchor recovery of the skill's anchor (searched on the validation "
        f"topics); kl = KL(expert || model) on the expert's own held-out responses (nats per token); "
        f"false_format = the worst rate, over the merged skills, of that skill's format on the held-out prompts "
        f"without any instruction; base_text_ppl = perplexity of the base's own greedy responses to them. Every "
        f"method's setting chosen on {len(rx.VALIDATION)} validation topics x {len(rx.TEMPLATES)} phrasings "
        f"(mean strict accuracy, then the lower false-format rate, then the mean anchor recovery; grid "
        f"{args.grid!r}: with 'lambda' only the task-arithmetic lambda is tuned, every other method keeps its first "
        f"setting); lambda from {args.lams}; the head/neuron mechanism-aware merges are built on that task "
        f"arithmetic; task_arithmetic_weighted tunes one weight per expert ({WEIGHT_LEVELS}, lambda 1) and "
        f"owner_local is owner_takes_top over those weights with each expert's full delta on its top-k modules "
        f"(others=1). Scores: each expert's Weight Patching screen-then-verify on its own capability (heads and "
        f"neurons; modules separately), exact scores of the verified top {args.top_k * 2} per kind on the "
        f"validation prompts."
        + (f" Settings used without tuning here (grid positions): {args.fixed}." if args.fixed else "")
        + f" Scoring {t_scores:.0f} s, total "
        f"{time.perf_counter() - t0:.0f} s.\n\nChosen settings:\n\n" + "\n".join(f"- {c}" for c in chosen),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["all", "table", "memory", "real"], default="all")
    parser.add_argument("--combos", default="all", help="real part: e.g. caps+quotes,caps+quotes+end")
    parser.add_argument("--lams", type=float, nargs="+", default=[0.5, 0.75, 1.0], help="real part: lambda grid")
    parser.add_argument("--stride", type=int, default=2, help="use every n-th held-out format prompt")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument(
        "--grid", choices=["lambda", "full"], default="lambda", help="real part: tune only lambda, or every method"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--fixed",
        default="",
        help="real part: method=position of a grid setting used without tuning, e.g. ties=0,owner_blend=1",
    )
    parser.add_argument("--owner-local-k", type=int, nargs="+", default=[4, 8], help="real part: modules owned")
    parser.add_argument("--methods", default="all", help="real part: e.g. task_arithmetic_weighted,owner_local")
    parser.add_argument("--anchor-method", choices=["model_diff", "instruction"], default="model_diff")
    parser.add_argument("--build-caps", action="store_true", help="build the SmolLM2 caps expert if missing")
    args = parser.parse_args()
    if args.part in ("all", "table"):
        merge_table(args)
    if args.part in ("all", "memory"):
        memory(args)
    if args.part == "real":
        real_table(args)


if __name__ == "__main__":
    main()
