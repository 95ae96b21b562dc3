"""The screen stage: score components against the anchor, first-order and/or exact (docs/method.md,
"Scores").

Methods: ``first_order`` (every component of ``kinds``, or the given ``components``, in one backward
pass per batch), ``local_exact`` (each component's own block exact, the blocks above it linearized),
``integrated_gradients`` (``steps`` points), ``exact`` (one patched forward per component, for
``components`` or every component of ``kinds``), ``verify`` (screen-then-verify: the ``screen``
method for everything, exact for the ``top_k`` of each kind by ``|screen score|`` plus any
``components``).

Results go to ``scores`` (long table, all methods) and ``verified`` (first-order vs exact). Exact
scores are appended as each group of components finishes; re-running the same config resumes where it
stopped. ``backend="ray"`` scores the exact part on Ray actors (:mod:`weightpatch.backends`).

``objective="behaviour"`` scores by the teacher-forced log-probability of the specialized model's own
greedy responses (:mod:`weightpatch.behaviour`; the responses are generated once and kept in the
``responses`` table) instead of the anchor, with first order, integrated gradients and exact scores
(one whole-model forward per component). After scoring, the anchor validity check
(:mod:`weightpatch.validity`, ``validity_k`` > 0) patches the top-k components of one kind and
measures both recoveries; its table is ``anchor_validity`` and its one-line verdict goes to the log,
the run record and the CLI summary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from weightpatch.behaviour import BehaviourScorer
from weightpatch.checkers import evaluate
from weightpatch.components import KINDS, Kind
from weightpatch.config import ScreenConfig
from weightpatch.errors import WeightPatchError
from weightpatch.generation import generate_ids
from weightpatch.pair import ModelPair
from weightpatch.pipeline.forecast import forecast
from weightpatch.pipeline.inputs import (
    behaviour_scorer,
    parse_max_memory,
    scoring_objective,
    scoring_run,
    select_prompts,
)
from weightpatch.results import ScoreTable
from weightpatch.rundir import CONSOLE, RunDir
from weightpatch.scoring import AnchorScorer, GapScorer
from weightpatch.screening.first_order import gradient_scores
from weightpatch.screening.local_exact import local_exact_scores
from weightpatch.screening.verify import screen_then_verify, verification_candidates, verified_table
from weightpatch.validity import (
    Verdict,
    anchor_validity,
    currency_curves,
    default_kind,
    objective_agreement,
    validity_verdict,
)

logger = logging.getLogger("weightpatch")
EXHAUSTIVE_WARNING = 5000


@dataclass
class ScreenResult:
    scores: ScoreTable  # every score in the run directory (all methods)
    verified: pd.DataFrame | None  # first_order vs exact of the verified components
    n_prompts: int
    n_excluded: int  # prompts with a tiny gap (of the run's objective), left out of every mean
    run_dir: Path
    validity: Verdict | None = None  # the anchor validity check (None: skipped)


def screen_scores(
    scorer: GapScorer,
    method: str,
    kinds: tuple[Kind, ...] = KINDS,
    components: list[str] | None = None,
    steps: int = 8,
    per_prompt: bool = True,
    exact_blocks: int = 2,
    progress: bool = True,
) -> ScoreTable:
    """Scores of a screening ``method`` (first_order, integrated_gradients with ``steps`` points, or
    local_exact with ``exact_blocks``) for every component of ``kinds``, or for the named ``components``;
    gradient scores carry a standard error across prompts with ``per_prompt``."""
    if method == "local_exact":
        if not isinstance(scorer, AnchorScorer):
            raise WeightPatchError(f"local_exact reads the anchor layer; the {scorer.objective} objective has none")
        return local_exact_scores(
            scorer, kinds=kinds, components=components, exact_blocks=exact_blocks, progress=progress
        )
    steps = 1 if method == "first_order" else steps
    return gradient_scores(
        scorer, kinds=kinds, components=components, steps=steps, per_prompt=per_prompt, progress=progress
    )


def screen_options(cfg: ScreenConfig) -> dict:
    """The keyword arguments of :func:`screen_scores` that ``cfg`` sets."""
    return {
        "steps": cfg.steps,
        "per_prompt": cfg.first_order_stderr,
        "exact_blocks": cfg.local_exact_blocks,
        "progress": cfg.progress,
    }


def screen_stage(cfg: ScreenConfig, scorer: GapScorer, run: RunDir, method: str) -> ScoreTable:
    """Screen scores of ``cfg.kinds`` by ``method``, reused from the run directory per kind."""
    kinds = cfg.kinds
    have = set(run.scores().select(method).frame["kind"])
    missing = tuple(k for k in kinds if k not in have)
    if missing:
        run.append_scores(screen_scores(scorer, method, missing, **screen_options(cfg)))
    else:
        logger.info("%s scores for %s already in the run directory", method, ", ".join(kinds))
    return run.scores().select(method)


def _model_location(given: str) -> str:
    """What a Ray worker opens: the absolute local directory, or the hub id (each worker fetches it)."""
    path = Path(given).expanduser()
    return str(path.resolve()) if path.exists() else given


def exact_backend(cfg: ScreenConfig, scorer: GapScorer):
    """The exact-score backend of ``cfg.backend``: this process (reusing ``scorer``, either objective)
    or Ray actors (the anchor objective; the config refuses Ray for the behaviour objective)."""
    from weightpatch.backends import JobSpec, LocalBackend, make_backend

    if cfg.backend == "local":
        return LocalBackend.from_scorer(scorer, cfg.variants_per_batch)
    if not isinstance(scorer, AnchorScorer):
        raise WeightPatchError(f"the Ray backend scores the anchor objective only, not {scorer.objective}")
    job = JobSpec(
        base=_model_location(cfg.base),
        specialized=_model_location(cfg.specialized),
        anchor=scorer.anchor,
        texts=scorer.texts,
        receiver=scorer.pair.receiver,
        dtype=cfg.dtype,
        device=cfg.device,
        device_map=cfg.device_map,
        max_memory=parse_max_memory(cfg.max_memory),
        trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
        batch_size=cfg.batch_size,
        min_relative_gap=cfg.min_relative_gap,
        variants_per_batch=cfg.variants_per_batch,
        seed=cfg.seed,
    )
    return make_backend(
        "ray", job, address=cfg.address, workers=cfg.workers, num_cpus=cfg.worker_cpus, num_gpus=cfg.worker_gpus
    )


def _log_todo(cfg: ScreenConfig, run: RunDir, names: list[str]) -> set[str]:
    done = run.done("exact")
    todo = [n for n in names if n not in done]
    if todo:
        logger.info(
            "exact (%s backend): %d components to score (%d already done)",
            cfg.backend,
            len(todo),
            len(names) - len(todo),
            extra=CONSOLE,
        )
    return done


def screen_components(cfg: ScreenConfig, scorer: GapScorer, run: RunDir) -> list[str]:
    """Compute (or resume) ``cfg.method``'s scores into ``run``; returns the verified component names."""
    space = scorer.pair.space
    named = [str(space.parse(c)) for c in cfg.components or []]
    save = run.append_scores
    if cfg.method in ("first_order", "integrated_gradients", "local_exact"):
        if named:
            save(screen_scores(scorer, cfg.method, components=named, **screen_options(cfg)))
        else:
            screen_stage(cfg, scorer, run, cfg.method)
        return []
    if cfg.method == "exact":
        todo = named or [str(c) for c in space.components(kinds=tuple(cfg.kinds))]
        if len(todo) > EXHAUSTIVE_WARNING:
            logger.warning("exact scoring of %d components: this is slow; consider --method verify", len(todo))
        done = _log_todo(cfg, run, todo)
        with exact_backend(cfg, scorer) as backend:
            backend.run(todo, skip=done, on_result=save, progress=cfg.progress)
        return todo
    screened = screen_stage(cfg, scorer, run, cfg.screen)
    candidates = verification_candidates(screened, cfg.kinds, cfg.top_k, extra=named)
    done = _log_todo(cfg, run, candidates)
    screen_then_verify(
        scorer,
        cfg.kinds,
        cfg.top_k,
        extra=named,
        screened=screened,
        backend=exact_backend(cfg, scorer),
        skip=done,
        on_result=save,
        progress=cfg.progress,
    )
    return candidates


def checker_metric(cfg: ScreenConfig, scorer: AnchorScorer):
    """IFEval strict prompt-level accuracy of greedy responses (``cfg.response_tokens`` tokens) on the
    run's prompts that carry instructions, or None when none does."""
    records = select_prompts(cfg, cfg.seed, warn=False)  # the stage has warned
    chosen = [(r, t) for r, t in zip(records, scorer.texts, strict=True) if r.instruction_id_list]
    if not chosen:
        return None
    tokenizer = scorer.pair.tokenizer

    def metric(model) -> float:
        ids = generate_ids(model, tokenizer, [t for _, t in chosen], max_new_tokens=cfg.response_tokens)
        accuracy, _ = evaluate([r for r, _ in chosen], tokenizer.batch_decode(ids, skip_special_tokens=True))
        return accuracy.prompt_strict

    return metric


def validity_stage(
    cfg: ScreenConfig, run: RunDir, scorer: AnchorScorer, behaviour: BehaviourScorer, table: ScoreTable
) -> Verdict:
    """The anchor validity check of the run's ranking (reused from the run directory when done)."""
    frame = run.load_table("anchor_validity")
    if frame is None:
        frame = anchor_validity(
            scorer,
            behaviour,
            table,
            k=cfg.validity_k,
            controls=cfg.validity_controls,
            seed=cfg.seed,
            metric=checker_metric(cfg, scorer),
        )
        run.save_table("anchor_validity", frame)
    verdict = validity_verdict(frame, ranked_by=cfg.objective)
    run.update_record(anchor_validity={"status": verdict.status, "line": verdict.line})
    (logger.warning if verdict.warns else logger.info)("%s", verdict.line, extra=CONSOLE)
    return verdict


def objective_comparison(
    cfg: ScreenConfig, run: RunDir, scorer: AnchorScorer, behaviour: BehaviourScorer, scores: ScoreTable
) -> None:
    """In a behaviour run: first-order anchor scores of the same kinds beside the behaviour ones, their
    rank agreement per kind and layer (``objective_agreement``) and the sufficiency curves of the
    top-k by each objective in both currencies (``currency_curves``), reused when done."""
    if run.has("objective_agreement") and run.has("currency_curves"):
        return
    anchor_scores = screen_scores(scorer, "first_order", tuple(cfg.kinds), progress=cfg.progress)
    behaviour_scores = scores.select("first_order")
    run.save_table("objective_agreement", objective_agreement(anchor_scores, behaviour_scores))
    rankings = {"anchor": anchor_scores, "behaviour": behaviour_scores}
    kind = default_kind(behaviour_scores)
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= cfg.validity_k] or [cfg.validity_k]
    run.save_table("currency_curves", currency_curves(scorer, behaviour, rankings, ks, kind))


def run_screen(cfg: ScreenConfig, pair: ModelPair | None = None) -> ScreenResult:
    """Score the components of ``cfg`` on its prompts against its anchor, in its run directory."""
    forecast("screen", cfg, pair)
    with scoring_run(cfg, "screen", pair, cfg.components or []) as (run, scorer):
        check = bool(cfg.validity_k) and scorer.pair.receiver == "base"  # the check patches the base
        objective = scoring_objective(cfg, run, scorer)
        behaviour = objective if isinstance(objective, BehaviourScorer) else None
        if behaviour is None and check:
            try:
                behaviour = behaviour_scorer(cfg, run, scorer)
            except WeightPatchError as error:  # the check is a diagnostic: it never stops an anchor run
                logger.warning("anchor validity check skipped: %s", error, extra=CONSOLE)
        verified_names = screen_components(cfg, objective, run)
        scores = run.scores()
        verified = None
        if verified_names:
            verified = verified_table(scores, verified_names)
            run.save_table("verified", verified)
        run.update_record(
            screening={
                "n_prompts": len(scorer.texts),
                "n_excluded": objective.n_excluded,
                "anchor_layer": scorer.layer,
                "objective": cfg.objective,
            }
        )
        verdict = None
        if check and behaviour is not None:
            verdict = validity_stage(cfg, run, scorer, behaviour, scores)
            if cfg.objective == "behaviour":
                objective_comparison(cfg, run, scorer, behaviour, scores)
        return ScreenResult(scores, verified, len(scorer.texts), objective.n_excluded, run.path, verdict)
