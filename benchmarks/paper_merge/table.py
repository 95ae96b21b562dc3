"""The merge table in the paper's setting (issue 28): IF+MATH, IF+CODE and IF+MATH+CODE merges of the
experts built by ``experts.py``, every method tuned on validation with the same budget, scored on the
test splits with paired bootstrap intervals, and the verdict by the rule fixed in advance
(docs/method.md, "Mechanism-aware merging"; README).

    OMP_NUM_THREADS=1 python benchmarks/paper_merge/table.py if+math         # one combination, resumable
    OMP_NUM_THREADS=1 python benchmarks/paper_merge/table.py --plan if+math  # the configurations, no compute
    python benchmarks/paper_merge/table.py --report                          # tables + verdict so far

Every merge is built by running the exact ``wpatch merge`` command recorded with its row (so a row
rebuilds with that command alone); scores come from the library's sources: Weight Patching
(``wpatch anchor`` + ``wpatch screen`` of each expert against the base, first order over heads and
neurons with the top 20 per kind re-scored exactly; the IF expert gets an instruction anchor on its
prompts with and without the instruction, MATH and CODE a model-difference anchor on their own
prompts), magnitude, SNIP (on each expert's training texts) and random (seeded), all over heads and
neurons. Outputs under ``~/.cache/weightpatch-bench/paper-merge/table``: ``<combo>-val.jsonl`` (one line
per tuned configuration), ``<combo>.jsonl`` (one line per row, with per-item test scores), ``merges/``
(the merges being evaluated; removed once scored), ``saved/`` (``--save``: each combination's best
Weight Patching rule and best baseline, rebuilt from their recorded commands).

Budget (the same for every method): ``BUDGET`` = 4 configurations per method, chosen on ``VAL_N`` = 24
validation items per skill by mean normalized score; what was cut to fit about 8 hours of this 2-core
machine per combination: 4 configurations instead of up to 12, validation subsets of 24 items, greedy
answers of at most 48 tokens (code 72).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from paper_merge import data, experts  # noqa: E402
from paper_merge.stats import Interval, paired_bootstrap  # noqa: E402

ROOT = experts.ROOT / "table"
COMBINATIONS = {"if+math": ("if", "math"), "if+code": ("if", "code"), "if+math+code": ("if", "math", "code")}
BUDGET = 4
VAL_N = 24
SOURCES = ("weight_patching", "magnitude", "snip", "random")
RULES = ("protect_then_add", "stitch", "owner_takes_top", "score_weighted")
BASELINES = ("task_arithmetic", "ties", "dare_ties", "consensus", "localize_stitch", "led_snip", "layer_swap")
KINDS = "head,neuron"
NUM_LAYERS = 30  # SmolLM2-135M


# ---------------------------------------------------------------- configurations


def _grid(**axes) -> list[list[str]]:
    """Every combination of the flag values in ``axes`` (``flag_name=[values]``), as flag lists."""
    names = list(axes)
    return [
        [item for name, value in zip(names, values, strict=True) for item in (f"--{name.replace('_', '-')}", value)]
        for values in itertools.product(*(axes[n] for n in names))
    ]


def layer_owners(skills: tuple[str, ...], k: int) -> str:
    """IF (expert 0) owns the bottom and top ``k`` layers, the other experts split the middle in order."""
    middle = list(range(k, NUM_LAYERS - k))
    owners = [0] * NUM_LAYERS
    per = math.ceil(len(middle) / (len(skills) - 1))
    for j, layer in enumerate(middle):
        owners[layer] = 1 + j // per
    return ",".join(map(str, owners))


def configurations(skills: tuple[str, ...]) -> dict[str, list[list[str]]]:
    """Row name -> the ``wpatch merge`` flags of each configuration tried (``BUDGET`` per row)."""
    n = len(skills)
    ones = ",".join(["1"] * n)
    rows: dict[str, list[list[str]]] = {
        "task_arithmetic": [
            ["--weights", ones],
            ["--weights", ",".join(["0.7"] * n)],
            ["--weights", ",".join(["1"] + ["0.7"] * (n - 1))],
            ["--weights", ",".join(["0.7"] + ["1"] * (n - 1))],
        ],
        "ties": [["--method", "ties", *f] for f in _grid(density=["0.2", "0.5"], lam=["1.0", "1.5"])],
        "dare_ties": [["--method", "dare_ties", *f] for f in _grid(drop_rate=["0.5", "0.8"], lam=["0.7", "1.0"])],
        "consensus": [
            ["--method", "consensus", "--min-agree", str(min(n, 2)), *f]
            for f in _grid(tall_lambda=["0.4", "0.8"], lam=["0.7", "1.0"])
        ],
        "localize_stitch": [
            ["--method", "localize_stitch", *f] for f in _grid(density=["0.05", "0.2"], lam=["1.0", "1.5"])
        ],
        "led_snip": [
            ["--mechanism", "stitch", "--conflict", "drop", *source_flags("snip", skills), *f]
            for f in _grid(fraction=["0.05", "0.2"], strength=["1.0", "1.5"])
        ],
        "layer_swap": [["--method", "layer_swap", "--layer-owners", layer_owners(skills, k)] for k in (2, 4, 6, 8)],
    }
    rule_grids = {
        "protect_then_add": _grid(fraction=["0.01", "0.05"], lam=["0.7", "1.0"]),
        "stitch": _grid(fraction=["0.05", "0.2"], strength=["1.0", "1.5"]),
        "owner_takes_top": _grid(fraction=["0.01", "0.05"], rest=["0.7", "1.0"]),
        "score_weighted": _grid(floor=["0.3", "0.6"], lam=["1.0", "1.3"]),
    }
    for rule, grid in rule_grids.items():
        for source in SOURCES:
            rows[f"{rule}:{source}"] = [["--mechanism", rule, *source_flags(source, skills), *f] for f in grid]
    assert all(len(c) == BUDGET for c in rows.values()), {k: len(c) for k, c in rows.items()}
    return rows


def source_flags(source: str, skills: tuple[str, ...]) -> list[str]:
    """The ``wpatch merge`` flags that select ``source``'s scores for the experts of ``skills``."""
    flags = ["--score-kinds", KINDS]
    if source == "weight_patching":
        runs = ",".join(str(ROOT / "runs" / s) for s in skills)
        return [*flags, "--scores", runs, "--score-method", "first_order"]
    if source == "snip":
        return [*flags, "--score-source", "snip", "--snip-data", ",".join(str(snip_file(s)) for s in skills)]
    return [*flags, "--score-source", source]


# ---------------------------------------------------------------- inputs of the score sources


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
    return path


def snip_file(skill: str, n: int = 48) -> Path:
    """The expert's own training texts (prompt, target) for SNIP: the first ``n`` training pairs."""
    path = ROOT / "inputs" / f"snip-{skill}.jsonl"
    if not path.exists():
        answers = json.loads((experts.ROOT / "if_base_answers.json").read_text())
        pairs = experts.training_pairs(skill, answers)[:n]
        _write_jsonl(path, [{"prompt": p, "response": r} for p, r in pairs])
    return path


def anchor_prompts(skill: str, n: int = 48) -> Path:
    """IFEval-schema prompts of the expert's training split for its anchor and screen (IF: the
    instructed prompts with ``prompt_without_instruction``)."""
    path = ROOT / "inputs" / f"anchor-{skill}.jsonl"
    if path.exists():
        return path
    items = [it for it in data.items(skill, "train") if skill != "if" or it.constraint is not None][:n]
    records = []
    for i, it in enumerate(items):
        record = {"key": i, "prompt": it.prompt, "instruction_id_list": [], "kwargs": []}
        if skill == "if":
            spec = data.IF_CONSTRAINTS[it.constraint]
            record.update(
                instruction_id_list=[spec["instruction_id"]],
                kwargs=[{"end_phrase": data.END_PHRASE} if it.constraint == "end_phrase" else {}],
                prompt_without_instruction=experts.plain_question(it),
            )
        records.append(record)
    return _write_jsonl(path, records)


def wpatch(*args: str) -> list[str]:
    """The command line of ``wpatch`` run from this checkout."""
    return [sys.executable, "-c", "from weightpatch.cli.main import app; app()", *args]


def run(command: list[str], log: Path) -> None:
    """Run ``command`` (output appended to ``log``); a failure stops the table with its log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(f"\n$ {shlex.join(command)}\n")
        fh.flush()
        done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}), see {log}: {shlex.join(command)}")


def weight_patching_scores(skill: str) -> Path:
    """Anchor and screen run of expert ``skill`` against the base (cached run directory)."""
    out = ROOT / "runs" / skill
    if (out / "scores.parquet").exists():
        return out
    prompts = anchor_prompts(skill)
    base, expert = str(experts.BASE), str(experts.model_dir(skill))
    common = ["--run-dir", str(out), "--no-progress", "--batch-size", "8"]
    method = "instruction" if skill == "if" else "model_diff"
    run(
        wpatch(
            "anchor", base, expert, "--prompts", str(prompts), "--method", method, "--steering-prompts", "0", *common
        ),
        out.with_suffix(".log"),
    )
    run(
        wpatch(
            "screen",
            base,
            expert,
            "--prompts",
            str(prompts),
            "--kinds",
            "head,neuron,module",
            "--method",
            "verify",
            "--top-k",
            "20",
            *common,
        ),
        out.with_suffix(".log"),
    )
    return out


# ---------------------------------------------------------------- evaluation


def accuracy(model_name: str, model_dir: Path | None, skill: str, split: str, model=None, tok=None) -> dict:
    """Cached evaluation of a reference model (base, expert, joint) on ``skill``/``split`` (val: the
    first ``VAL_N`` items)."""
    limit = VAL_N if split == "val" else None
    path = experts.ROOT / "evaluations" / model_name / f"{skill}-{split}{limit or ''}.json"
    if not path.exists() and model is None:
        model, tok = experts.load_model(model_dir)
    return experts.evaluate(model, tok, skill, split, path, limit)


def retention(model, tok) -> dict[str, float]:
    """Perplexity of the base model's own answers to uninstructed IF test prompts, and the mean KL
    from the base's next-token distribution to the model's on those answers."""
    from weightpatch.merging.evaluate import _response_batches, _response_logprobs

    base_eval = json.loads((experts.ROOT / "evaluations" / "base" / "if-test.json").read_text())
    items = data.if_items("test")
    plain = [(it.prompt, r) for it, r in zip(items, base_eval["responses"], strict=True) if it.constraint is None][:40]
    batches = _response_batches(tok, [p for p, _ in plain], [r for _, r in plain], 8)
    ref_path = ROOT / "base_logprobs.pt"
    if ref_path.exists():
        ref = torch.load(ref_path)
    else:
        base, _ = experts.load_model(experts.BASE)
        ref = _response_logprobs(base, batches)
        torch.save(ref, ref_path)
    got = _response_logprobs(model, batches)
    nll, kl, count = 0.0, 0.0, 0
    for (ids, _mask, target), r, g in zip(batches, ref, got, strict=True):
        tokens = ids[:, 1:][target[:, :-1]]
        nll -= float(g.gather(1, tokens[:, None]).sum())
        kl += float((r.exp() * (r - g)).sum())
        count += len(tokens)
    return {"perplexity": math.exp(nll / count), "kl_to_base": kl / count}


def reference(skills: tuple[str, ...], split: str) -> dict[str, dict[str, float]]:
    """Base and expert accuracies per skill on ``split`` (the normalization)."""
    out = {}
    for s in skills:
        out[s] = {
            "base": accuracy("base", experts.BASE, s, split)["accuracy"],
            "expert": accuracy(s, experts.model_dir(s), s, split)["accuracy"],
        }
    return out


def normalized(acc: float, ref: dict[str, float]) -> float:
    """``(acc - base) / (expert - base)`` (nan when the expert does not beat the base)."""
    gain = ref["expert"] - ref["base"]
    return (acc - ref["base"]) / gain if gain > 0 else math.nan


def merge_command(skills: tuple[str, ...], flags: list[str], out: Path) -> list[str]:
    experts_dirs = [str(experts.model_dir(s)) for s in skills]
    return wpatch("merge", str(experts.BASE), *experts_dirs, "-o", str(out), "--overwrite", "--no-progress", *flags)


def evaluate_merge(out: Path, skills: tuple[str, ...], split: str, composite: bool) -> dict:
    """Accuracies (and per-item scores) of the merged model at ``out`` on the combination's skills."""
    model, tok = experts.load_model(out)
    limit = VAL_N if split == "val" else None
    result: dict = {"skills": {}}
    evaluated = list(skills) + (["composite"] if composite and split == "test" else [])
    with_tmp = ROOT / "tmp-eval"
    for s in evaluated:
        path = with_tmp / f"{s}.json"
        path.unlink(missing_ok=True)
        r = experts.evaluate(model, tok, s, split, path, limit)
        path.unlink()
        result["skills"][s] = {k: r[k] for k in ("accuracy", "correct", "false_format") if k in r}
    if split == "test":
        result["retention"] = retention(model, tok)
    return result


def run_combination(combo: str) -> None:
    """Tune every row on validation, then score its chosen configuration on test; resumable."""
    torch.set_num_threads(1)
    skills = COMBINATIONS[combo]
    for s in skills:
        if not (experts.model_dir(s) / "training.json").exists():
            raise SystemExit(f"expert {s} is not built yet: run benchmarks/paper_merge/experts.py")
        weight_patching_scores(s)
        snip_file(s)
    val_ref, test_ref = reference(skills, "val"), reference(skills, "test")
    val_log, rows_log = ROOT / f"{combo}-val.jsonl", ROOT / f"{combo}.jsonl"
    done_val = _read(val_log)
    done_rows = {r["row"] for r in _read(rows_log)}
    for row, configs in configurations(skills).items():
        if row in done_rows:
            continue
        tried = []
        for i, flags in enumerate(configs):
            key = {"row": row, "config": i}
            record = next((r for r in done_val if {"row": r["row"], "config": r["config"]} == key), None)
            if record is None:
                out = ROOT / "merges" / combo / f"{row.replace(':', '-')}-{i}"
                start = time.time()
                run(merge_command(skills, flags, out), ROOT / "merge.log")
                ev = evaluate_merge(out, skills, "val", composite=False)
                shutil.rmtree(out)
                scores = {s: normalized(ev["skills"][s]["accuracy"], val_ref[s]) for s in skills}
                record = {
                    **key,
                    "flags": flags,
                    "val_accuracy": {s: ev["skills"][s]["accuracy"] for s in skills},
                    "val_normalized": scores,
                    "mean_normalized": sum(scores.values()) / len(scores),
                    "seconds": round(time.time() - start, 1),
                }
                _append(val_log, record)
                done_val.append(record)
            tried.append(record)
        best = max(tried, key=lambda r: (_finite(r["mean_normalized"]), -r["config"]))
        out = ROOT / "merges" / combo / row.replace(":", "-")
        command = merge_command(skills, best["flags"], out)
        start = time.time()
        run(command, ROOT / "merge.log")
        ev = evaluate_merge(out, skills, "test", composite="math" in skills)
        shutil.rmtree(out)
        norm = {s: normalized(ev["skills"][s]["accuracy"], test_ref[s]) for s in skills}
        _append(
            rows_log,
            {
                "row": row,
                "chosen": best["config"],
                "flags": best["flags"],
                "command": shlex.join(["wpatch", *command[3:]]),
                "test": ev,
                "normalized": norm,
                "mean_normalized": sum(norm.values()) / len(norm),
                "val_mean_normalized": best["mean_normalized"],
                "seconds": round(time.time() - start, 1),
            },
        )
        print(f"[{time.strftime('%H:%M:%S')}] {combo} {row}: {norm}", flush=True)


def _finite(x: float) -> float:
    return x if isinstance(x, float) and math.isfinite(x) else -math.inf


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------- the verdict rule (fixed in advance)

GUIDED = tuple(f"{rule}:weight_patching" for rule in RULES)
MARGIN = 0.05


def difference(row_a: dict, row_b: dict, skills: tuple[str, ...], test_ref: dict, seed: int = 0) -> Interval:
    """Paired bootstrap interval of ``mean normalized(a) - mean normalized(b)`` over the test items."""
    groups = []
    for s in skills:
        a = [bool(c) for c in row_a["test"]["skills"][s]["correct"] if c is not None]
        b = [bool(c) for c in row_b["test"]["skills"][s]["correct"] if c is not None]
        groups.append((a, b, test_ref[s]["expert"] - test_ref[s]["base"]))
    return paired_bootstrap(groups, seed=seed)


def verdict(tables: dict[str, tuple[list[dict], tuple[str, ...], dict]]) -> tuple[str, list[str]]:
    """The verdict of docs/method.md ("The verdict rule") from ``combo -> (rows, skills, test_ref)``:
    ``not mergeable`` (gate failed), ``reproduced``, ``rule, not scores`` or ``refuted``; with the
    lines that justify it."""
    notes = []
    gate = False
    for combo, (rows, skills, _ref) in tables.items():
        for r in rows:
            if r["row"] in BASELINES and all(_finite(r["normalized"][s]) >= 0.5 for s in skills):
                gate = True
                notes.append(f"gate: {r['row']} keeps >= 0.5 on every skill of {combo}")
    if not gate:
        return "not mergeable", [*notes, "gate: no baseline keeps >= 0.5 normalized on every skill anywhere"]
    wins_baselines, wins_controls = 0, 0
    for combo, (rows, skills, ref) in tables.items():
        by_name = {r["row"]: r for r in rows}
        guided = [by_name[g] for g in GUIDED if g in by_name]
        baselines = [by_name[b] for b in BASELINES if b in by_name]
        if not guided or not baselines:
            continue
        best = max(guided, key=lambda r: _finite(r["mean_normalized"]))
        base_best = max(baselines, key=lambda r: _finite(r["mean_normalized"]))
        d = difference(best, base_best, skills, ref)
        beats = d.diff >= MARGIN and d.low > 0
        rule = best["row"].split(":")[0]
        controls = [by_name.get(f"{rule}:{c}") for c in ("magnitude", "random")]
        beats_controls = all(c is not None and best["mean_normalized"] > c["mean_normalized"] for c in controls)
        notes.append(
            f"{combo}: {best['row']} - {base_best['row']} = {d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
            f"{' (beats the baselines)' if beats else ''}; vs its magnitude/random controls: "
            + ", ".join(f"{c['mean_normalized']:.3f}" if c else "missing" for c in controls)
        )
        wins_baselines += beats
        wins_controls += beats and beats_controls
    if wins_controls >= 2:
        return "reproduced", notes
    if wins_baselines >= 2:
        return "rule, not scores", notes
    return "refuted", notes


def report() -> None:
    """Print each combination's table (rows measured so far) and the verdict."""
    tables = {}
    for combo, skills in COMBINATIONS.items():
        rows = _read(ROOT / f"{combo}.jsonl")
        if not rows:
            continue
        ref = reference(skills, "test")
        tables[combo] = (rows, skills, ref)
        print(
            f"\n{combo}: base / expert test accuracy "
            + ", ".join(f"{s} {ref[s]['base']:.3f}/{ref[s]['expert']:.3f}" for s in skills)
        )
        for name in ("base", *skills, "joint"):  # the reference rows: base, each expert, the joint fine-tune
            paths = {s: experts.ROOT / "evaluations" / name / f"{s}-test.json" for s in skills}
            if all(p.exists() for p in paths.values()):
                norm = {s: normalized(json.loads(paths[s].read_text())["accuracy"], ref[s]) for s in skills}
                cells = " ".join(f"{s}={v:.2f}" for s, v in norm.items())
                print(f"  {name:<34} mean={sum(norm.values()) / len(norm):.3f} {cells}")
        for r in rows:
            cells = " ".join(f"{s}={r['normalized'][s]:.2f}" for s in skills)
            ret = r["test"].get("retention", {})
            ppl = ret.get("perplexity", math.nan)
            print(f"  {r['row']:<34} mean={r['mean_normalized']:.3f} {cells} ppl={ppl:.2f} `{r['command']}`")
    if tables:
        name, notes = verdict(tables)
        print(f"\nverdict: {name}")
        for line in notes:
            print("  " + line)


def save_winners() -> list[Path]:
    """Rebuild, as Hugging Face directories under ``ROOT/saved/<combo>/``, each combination's best
    Weight Patching rule and best baseline, by running their recorded commands."""
    saved = []
    for combo, skills in COMBINATIONS.items():
        rows = _read(ROOT / f"{combo}.jsonl")
        for group in (GUIDED, BASELINES):
            candidates = [r for r in rows if r["row"] in group]
            if not candidates:
                continue
            best = max(candidates, key=lambda r: _finite(r["mean_normalized"]))
            out = ROOT / "saved" / combo / best["row"].replace(":", "-")
            run(merge_command(skills, best["flags"], out), ROOT / "merge.log")
            saved.append(out)
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("combinations", nargs="*", help=f"any of {', '.join(COMBINATIONS)} (default: all)")
    parser.add_argument("--plan", action="store_true", help="print the configurations and commands, run nothing")
    parser.add_argument("--report", action="store_true", help="print the tables and the verdict so far")
    parser.add_argument("--save", action="store_true", help="rebuild the winning merges and best baselines")
    args = parser.parse_args()
    unknown = [c for c in args.combinations if c not in COMBINATIONS]
    if unknown:
        parser.error(f"unknown combination {unknown[0]!r}; choose from {', '.join(COMBINATIONS)}")
    if args.report:
        report()
        return
    if args.save:
        for path in save_winners():
            print(path)
        return
    for combo in args.combinations or list(COMBINATIONS):
        if args.plan:
            for row, configs in configurations(COMBINATIONS[combo]).items():
                for flags in configs:
                    print(
                        combo, row, shlex.join(["wpatch", *merge_command(COMBINATIONS[combo], flags, Path("OUT"))[3:]])
                    )
            continue
        run_combination(combo)


if __name__ == "__main__":
    main()
