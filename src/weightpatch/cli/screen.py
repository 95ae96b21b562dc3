"""``wpatch screen``: score components against the anchor, first-order and/or exact.

Methods: ``first_order`` (every component of ``--kinds`` in one backward pass per batch),
``integrated_gradients`` (``--steps`` points), ``exact`` (one patched forward per component, for
``--components`` or every component of ``--kinds``), ``verify`` (screen-then-verify: first-order
for everything, exact for the ``--top-k`` of each kind by ``|first-order|``).

Results go to ``scores.parquet`` (long table, all methods) and ``verified.parquet`` (first-order
vs exact). Exact scores are appended as each group of components finishes; re-running the same
command resumes where it stopped. ``--backend ray`` scores the exact part on Ray actors instead
of this process (:mod:`weightpatch.backends`; ``--address`` of a cluster, ``--workers`` actors).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Annotated

import typer

from weightpatch.cli import common, summary
from weightpatch.config import ScreenConfig, build_config
from weightpatch.errors import WeightPatchError
from weightpatch.results import ScoreTable
from weightpatch.rundir import RunDir
from weightpatch.runner import render_prompts

logger = logging.getLogger("weightpatch")


def anchor_sha256(stem: Path) -> str:
    h = hashlib.sha256()
    for suffix in (".safetensors", ".json"):
        f = stem.with_suffix(suffix)
        if not f.is_file():
            raise WeightPatchError(
                f"no anchor at {stem}(.safetensors/.json); build one with `wpatch anchor` (same --run-dir) "
                f"or pass --anchor"
            )
        h.update(f.read_bytes())
    return h.hexdigest()


def _gradient_pass(scorer, run: RunDir, kinds, method: str, steps: int, progress: bool) -> ScoreTable:
    """First-order / integrated-gradient scores of ``kinds``, reused from the run dir when present."""
    from weightpatch.screening.first_order import gradient_scores

    have = run.scores().select(method).frame
    missing = [k for k in kinds if k not in set(have["kind"])]
    if missing:
        table = gradient_scores(scorer, kinds=missing, steps=1 if method == "first_order" else steps, progress=progress)
        run.append_scores(table)
    else:
        logger.info("%s scores for %s already in the run directory", method, ", ".join(kinds))
    return run.scores().select(method)


def _model_location(given: str) -> str:
    """What a Ray worker opens: the absolute local directory, or the hub id (each worker fetches it)."""
    path = Path(given).expanduser()
    return str(path.resolve()) if path.exists() else given


def _backend(cfg: ScreenConfig, scorer, texts: list[str]):
    """The exact-score backend of ``--backend``: this process (reusing ``scorer``) or Ray actors."""
    from weightpatch.backends import JobSpec, LocalBackend, make_backend

    if cfg.backend == "local":
        return LocalBackend.from_scorer(scorer, cfg.variants_per_batch)
    pair = scorer.pair
    job = JobSpec(
        base=_model_location(cfg.base),
        specialized=_model_location(cfg.specialized),
        anchor=scorer.anchor,
        texts=texts,
        receiver=pair.receiver,
        dtype=cfg.dtype,
        device=cfg.device,
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


def _exact_pass(scorer, run: RunDir, components, cfg: ScreenConfig, texts: list[str]) -> ScoreTable:
    done = run.done("exact")
    todo = [c for c in components if str(c) not in done]
    if todo:
        logger.info(
            "exact (%s backend): %d components to score (%d already done)",
            cfg.backend,
            len(todo),
            len(components) - len(todo),
        )
        with _backend(cfg, scorer, texts) as backend:
            backend.run(todo, skip=done, on_result=lambda rows: run.append_scores(rows), progress=cfg.progress)
    return run.scores().select("exact")


def verified_table(run: RunDir, candidates: list[str]) -> None:
    table = run.scores()
    if not len(table):
        return
    wide = table.side_by_side()
    wide = wide[wide["component"].isin(candidates)]
    if "exact" in wide.columns:
        wide = wide.sort_values("exact", ascending=False, key=abs)
    run.save_table("verified", wide.reset_index(drop=True))


def run_screen(cfg: ScreenConfig, pair, run: RunDir, anchor, texts: list[str]) -> ScoreTable:
    from weightpatch.scoring import AnchorScorer

    space = pair.space
    components = [space.parse(c) for c in cfg.components] if cfg.components else None
    with common.console.status(f"scoring base and specialized on {len(texts)} prompts"):
        scorer = AnchorScorer(pair, anchor, texts, cfg.batch_size, cfg.min_relative_gap)
    if scorer.n_excluded:
        logger.warning("%d prompts with a tiny anchor gap are excluded from every mean", scorer.n_excluded)
    if cfg.method in ("first_order", "integrated_gradients"):
        if components:
            from weightpatch.screening.first_order import gradient_scores

            run.append_scores(gradient_scores(scorer, components=components, steps=cfg.steps, progress=cfg.progress))
        else:
            _gradient_pass(scorer, run, cfg.kinds, cfg.method, cfg.steps, cfg.progress)
    elif cfg.method == "exact":
        todo = components or list(space.components(kinds=tuple(cfg.kinds)))
        if len(todo) > 5000:
            logger.warning("exact scoring of %d components: this is slow; consider --method verify", len(todo))
        _exact_pass(scorer, run, todo, cfg, texts)
        verified_table(run, [str(c) for c in todo])
    else:  # verify
        screened = _gradient_pass(scorer, run, cfg.kinds, "first_order", cfg.steps, cfg.progress)
        candidates = [c for k in cfg.kinds for c in screened.top(cfg.top_k, kind=k, by_abs=True).components()]
        if components:
            candidates += [str(c) for c in components if str(c) not in candidates]
        _exact_pass(scorer, run, candidates, cfg, texts)
        verified_table(run, candidates)
    run.update_record(
        screening={"n_prompts": len(texts), "n_excluded": scorer.n_excluded, "anchor_layer": anchor.layer}
    )
    return run.scores()


def screen(
    base: common.BaseArg,
    specialized: common.SpecArg,
    prompts: common.PromptsOpt = None,
    anchor: Annotated[Path | None, typer.Option(help="anchor path stem [default: <run-dir>/anchor].")] = None,
    method: Annotated[
        str | None, typer.Option(help="first_order, exact, verify (screen-then-verify) or integrated_gradients.")
    ] = None,
    kinds: Annotated[str | None, typer.Option(help="granularities: layer,module,head,neuron.")] = None,
    components: Annotated[str | None, typer.Option(help="score only these, e.g. L1.attn.head2,L0.mlp.")] = None,
    top_k: Annotated[int | None, typer.Option(help="components per kind verified exactly (verify).")] = None,
    steps: Annotated[int | None, typer.Option(help="integrated-gradient steps.")] = None,
    max_prompts: common.MaxPromptsOpt = None,
    config: common.ConfigOpt = None,
    device: common.DeviceOpt = None,
    dtype: common.DtypeOpt = None,
    batch_size: common.BatchOpt = None,
    seed: common.SeedOpt = None,
    run_dir: common.RunDirOpt = None,
    trust_remote_code: common.TrustOpt = None,
    progress: common.ProgressOpt = None,
    backend: Annotated[
        str | None, typer.Option(help="where exact scores run: local (this process) or ray. [default: local]")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (auto, ray://host:10001); default: start a local one.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Ray actors, each loading the pair once. [default: one per CPU]")
    ] = None,
    debug: common.DebugOpt = False,
) -> None:
    """Score components by how much of the anchor gap their own specialized weights recover."""
    cfg = build_config(
        ScreenConfig,
        config,
        base=base,
        specialized=specialized,
        prompts=prompts,
        anchor=anchor,
        method=method,
        kinds=kinds,
        components=components,
        top_k=top_k,
        steps=steps,
        max_prompts=max_prompts,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        seed=seed,
        run_dir=run_dir,
        trust_remote_code=trust_remote_code,
        progress=progress,
        backend=backend,
        address=address,
        workers=workers,
    )
    from weightpatch.anchors import Anchor

    records = common.read_prompt_file(cfg.prompts)[: cfg.max_prompts]
    root = common.run_dir_of(cfg)
    stem = Path(cfg.anchor).with_suffix("") if cfg.anchor else root / "anchor"
    pair = common.open_pair(cfg)
    for c in cfg.components or []:  # fail on a bad name before anything is written
        pair.space.parse(c)
    identity = {**cfg.identity(), "anchor_sha256": anchor_sha256(stem)}
    loaded = Anchor.load(stem, pair)
    with RunDir.open(root, "screen", identity, pair.identities(), [cfg.base, cfg.specialized, cfg.prompts]) as run:
        texts = render_prompts(pair.tokenizer, [r.prompt for r in records], cfg.chat_template)
        table = run_screen(cfg, pair, run, loaded, texts)
        summary.print_summary(run, table)
        common.echo_path("run directory", Path(run.path))


def register(app: typer.Typer) -> None:
    app.command("screen")(common.handle_errors(screen))
