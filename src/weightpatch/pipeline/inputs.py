"""What every stage reads the same way: the pair, the prompts, how prompts are rendered, the anchor,
and the run directory it writes into.

Prompt selection and rendering are decided here once, for Python and ``wpatch`` alike: a prompt file
is read (IFEval JSONL, a CSV with a ``prompt`` column or one prompt per line, by content:
:func:`weightpatch.prompts.read_prompt_file`), shuffled with the config's seed, cut to
``max_prompts``, and rendered by :func:`weightpatch.runner.render_prompts` with the config's
``prompt_format``; the format actually used (``chat`` or ``raw``) is recorded in the run directory.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from weightpatch.anchors import Anchor
from weightpatch.behaviour import BehaviourScorer, specialized_responses
from weightpatch.config import AnchorConfig, PairOptions, PromptOptions, ScreenConfig, StageConfig, TraceConfig
from weightpatch.errors import WeightPatchError
from weightpatch.loading import resolve_device
from weightpatch.pair import ModelPair, ModelRef, check_finite, load_pair
from weightpatch.prompts import MIN_PROMPTS, PromptRecord, read_prompt_file
from weightpatch.rundir import CONSOLE, RunDir
from weightpatch.runner import render_prompts, resolve_prompt_format, run_segment
from weightpatch.scoring import AnchorScorer, GapScorer

logger = logging.getLogger("weightpatch")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_pair(cfg: PairOptions, receiver: str = "base") -> ModelPair:
    """The pair named by ``cfg`` (receiver in memory, donor read lazily)."""
    logger.info("loading %s and %s", cfg.base, cfg.specialized)
    return load_pair(
        cfg.base,
        cfg.specialized,
        receiver=receiver,  # type: ignore[arg-type]
        dtype=cfg.dtype,
        device=cfg.device,
        device_map=cfg.device_map,
        max_memory=parse_max_memory(cfg.max_memory),
        trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
    )


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``"0=20GiB,cpu=60GiB"`` -> ``{0: "20GiB", "cpu": "60GiB"}`` (accelerate's ``max_memory``)."""
    if text is None:
        return None
    out: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, size = part.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise WeightPatchError(f"--max-memory {text!r}: write device=size pairs, e.g. 0=20GiB,cpu=60GiB")
        out[int(device) if device.strip().isdigit() else device.strip()] = size.strip()
    return out


def _same_model(given: str, ref: ModelRef) -> bool:
    """Whether a config's model (as typed) names the model ``ref`` of an open pair."""
    if given == ref.source:
        return True
    path = Path(given).expanduser()
    return path.exists() and path.resolve() in (Path(ref.source).expanduser().resolve(), Path(ref.path).resolve())


def check_pair_matches(cfg: PairOptions, pair: ModelPair) -> None:
    """Refuse a pair opened with other models or settings (dtype, device, remote code, revision) than
    ``cfg`` asks for: the stage would run with the pair's and record the config's."""
    asked = {
        "dtype": cfg.dtype,
        "device": str(resolve_device(cfg.device)),
        "device_map": cfg.device_map,
        "trust_remote_code": cfg.trust_remote_code,
        "revision": cfg.revision,
    }
    differences = [
        f"{key} {pair.options[key]!r} (pair) vs {value!r} (config)"
        for key, value in asked.items()
        if key in pair.options and pair.options[key] != value
        and not (key == "device" and pair.options.get("device_map") is not None)
    ]  # fmt: skip
    differences += [
        f"{role} {getattr(pair, role).source!r} (pair) vs {getattr(cfg, role)!r} (config)"
        for role in ("base", "specialized")
        if not _same_model(str(getattr(cfg, role)), getattr(pair, role))
    ]
    if differences:
        raise WeightPatchError(
            f"the pair given to this stage does not match its config ({'; '.join(differences)}); open the pair "
            f"with open_pair(cfg), or give the config the pair's settings"
        )


def pair_for(cfg: PairOptions, pair: ModelPair | None) -> ModelPair:
    """``pair`` when the caller already holds one (a notebook, the demo), checked against ``cfg``
    (:func:`check_pair_matches`), else the pair of ``cfg``."""
    if pair is not None:
        check_pair_matches(cfg, pair)
    if isinstance(cfg, StageConfig):
        seed_everything(cfg.seed)
    return pair if pair is not None else open_pair(cfg)


def ensure_finite(pair: ModelPair, run_path: Path) -> list[str]:
    """Refuse a pair with NaN/inf weights (:func:`weightpatch.pair.check_finite`), once per run
    directory and pair of weights: returns the weights' SHA-256 under which the caller records the
    verdict (``finite_weights``), skipping the check when the run directory already holds it. Runs
    before the directory is opened, so a refused pair is never recorded as the run's models."""
    ids = pair.identities()
    key = [ids[role]["weights_sha256"] for role in ("base", "specialized")]
    if (RunDir(run_path).record() or {}).get("finite_weights") != key:
        check_finite(pair)
    return key


def warn_if_few(records: Sequence[PromptRecord], path: Path, what: str) -> None:
    """Warn (shown by ``wpatch`` too) when a prompt set is smaller than :data:`MIN_PROMPTS`."""
    if len(records) < MIN_PROMPTS:
        logger.warning(
            "only %d %s from %s: separations and mean scores from so few prompts are not reliable; give at least %d",
            len(records),
            what,
            path,
            MIN_PROMPTS,
        )


def select_prompts(cfg: PromptOptions, seed: int, warn: bool = True) -> list[PromptRecord]:
    """The prompts a scoring stage uses: ``cfg.prompts`` shuffled with ``seed``, at most ``max_prompts``
    (``warn``: say when they are few; off for a second read of the same set)."""
    records = read_prompt_file(cfg.prompts)
    random.Random(seed).shuffle(records)
    records = records[: cfg.max_prompts]
    if warn:
        warn_if_few(records, cfg.prompts, "prompts")
    return records


def anchor_prompt_sets(cfg: AnchorConfig, warn: bool = True) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """``(train, heldout)`` prompt records of the anchor stage: the two files, or ``prompts`` split in
    half, each shuffled with the seed and cut to ``max_prompts``."""
    records = read_prompt_file(cfg.prompts)
    rng = random.Random(cfg.seed)
    if cfg.heldout is not None:
        train, heldout = list(records), read_prompt_file(cfg.heldout)
        rng.shuffle(train)
        rng.shuffle(heldout)
    else:
        if len(records) < 4:
            raise WeightPatchError(
                f"{cfg.prompts}: {len(records)} prompts are too few to split into training and held-out "
                f"halves; give at least 4, or a --heldout file"
            )
        shuffled = list(records)
        rng.shuffle(shuffled)
        half = len(shuffled) // 2
        train, heldout = shuffled[:half], shuffled[half:]
    if cfg.max_prompts is not None:
        train, heldout = train[: cfg.max_prompts], heldout[: cfg.max_prompts]
    if warn:
        warn_if_few(train, cfg.prompts, "training prompts")
        warn_if_few(heldout, cfg.heldout or cfg.prompts, "held-out prompts")
    return train, heldout


def render(pair: ModelPair, texts: Sequence[str], cfg: PromptOptions) -> list[str]:
    """Model-ready texts of raw prompts, in the config's prompt format."""
    return render_prompts(pair.tokenizer, list(texts), cfg.prompt_format)


def anchor_stem(cfg: StageConfig, anchor: Path | None) -> Path:
    """Where a stage reads its anchor: ``anchor`` (a path stem), else ``RUN_DIR/anchor``."""
    return Path(anchor).with_suffix("") if anchor else cfg.run_path / "anchor"


def anchor_sha256(stem: Path) -> str:
    """SHA-256 of an anchor's two files (what a screen or trace run is identified by)."""
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


def load_anchor(cfg: StageConfig, anchor: Path | None, pair: ModelPair) -> tuple[Anchor, str]:
    """The stage's anchor, checked against ``pair``, and its SHA-256."""
    stem = anchor_stem(cfg, anchor)
    sha = anchor_sha256(stem)
    return Anchor.load(stem, pair), sha


def open_run(
    cfg: StageConfig,
    command: str,
    pair: ModelPair | None,
    inputs: Sequence[str | Path | None],
    check_weights: bool = True,
    **identity: Any,
) -> RunDir:
    """Create or resume the run directory of ``cfg`` for ``command``: refuses one made from other
    models, prompts or settings. ``identity`` adds facts that determine the results beyond the config
    (the anchor's SHA-256). The prompt format actually used is recorded with the config. A pair with
    NaN/inf weights is refused before the directory is touched (checked once per run directory and
    pair of weights)."""
    config = {**cfg.identity(), **identity}
    if pair is not None and isinstance(cfg, PromptOptions):
        config["prompt_format"] = resolve_prompt_format(pair.tokenizer, cfg.prompt_format)
    models = pair.identities() if pair is not None else None
    finite = ensure_finite(pair, cfg.run_path) if pair is not None and check_weights else None
    run = RunDir.open(
        cfg.run_path,
        command,
        config,
        models,
        [i for i in inputs if i is not None],
        full_config=cfg.model_dump(mode="json"),
    )
    if finite is not None and (run.record() or {}).get("finite_weights") != finite:
        try:
            run.update_record(finite_weights=finite)
        except BaseException:
            run.close()
            raise
    return run


# The anchor gap, in units of the 16-bit round-off eps x ||h||, below which exact-style scores (each
# the difference of two rounded forwards) are rounding noise: on SmolLM2-135M in bfloat16 exact
# rankings agreed with float32 at Spearman 0.22-0.73 with the gap 9.4x the round-off (first order:
# >= 0.991), and at >= 0.99 on a tiny Llama with the gap ~270x (benchmarks/RESULTS.md, "bfloat16 vs
# float32"; tests/test_roundoff.py); 100x is the measured side of that interval.
EXACT_ROUNDOFF_FACTOR = 100.0


def roundoff_warning(scorer: AnchorScorer, exact: bool = False) -> str | None:
    """A warning when a 16-bit model's anchor gaps are within its round-off: on at least half the prompts
    ``|G(x)| <= eps x ||h(x)||``, ``h`` the receiver's residual stream at the anchor layer's last position
    and ``eps`` the dtype's machine epsilon (bfloat16: 2^-7, twice its unit round-off 2^-8), the size of
    one rounding of ``h`` in its largest coordinates. With ``exact`` (scores that are differences of two
    forwards: exact, local-exact, neurons, activation, the trace stage's curves and suppliers) also when
    the gap is below :data:`EXACT_ROUNDOFF_FACTOR` times that. None for float32/float64 models or gaps
    above it (one forward to the anchor)."""
    import torch

    dtype = scorer.pair.model.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    with torch.no_grad():
        norms = torch.cat(
            [
                run_segment(scorer.pair.model, scorer.pair.space, b, stop=scorer.layer, last_position=True)[0][:, -1]
                .float()
                .norm(dim=-1)
                .cpu()
                for b in scorer.batches
            ]
        )
    roundoff = torch.finfo(dtype).eps * norms
    gaps = scorer.gap.abs().float().cpu()
    name = str(dtype).removeprefix("torch.")
    figures = (
        f"(median |gap| {float(gaps.median()):.3g} vs eps x ||h|| = {float(roundoff.median()):.3g} at layer "
        f"{scorer.layer})"
    )
    within = int((gaps <= roundoff).sum())
    if within * 2 >= len(gaps):
        return (
            f"the anchor gap is within {name} round-off on {within} of {len(gaps)} prompts {figures}: "
            f"scores at this precision are mostly rounding noise; use --dtype float32"
        )
    below = int((gaps <= EXACT_ROUNDOFF_FACTOR * roundoff).sum())
    if not exact or below * 2 < len(gaps):
        return None
    return (
        f"the anchor gap is below {EXACT_ROUNDOFF_FACTOR:g}x {name} round-off on {below} of {len(gaps)} prompts "
        f"{figures}: exact scores (differences of two {name} forwards) do not rank reliably there; verify them "
        f"with --dtype float32 (first-order screens in {name} agree with float32 from about 1x)"
    )


def behaviour_scorer(cfg: ScreenConfig | TraceConfig, run: RunDir, scorer: AnchorScorer) -> BehaviourScorer:
    """The behaviour objective on the run's prompts: the specialized model's greedy responses are
    read from the run's ``responses`` table, or generated and saved there, and their SHA-256 is
    recorded in the run record."""
    saved = run.load_table("responses")
    if saved is not None and list(saved["prompt"]) == scorer.texts:
        responses = [[int(t) for t in r] for r in saved["response_ids"]]
    else:
        logger.info("specialized responses (%d tokens at most) for the behaviour objective", cfg.response_tokens)
        responses = specialized_responses(scorer.pair, scorer.texts, cfg.response_tokens, cfg.batch_size)
        decoded = scorer.pair.tokenizer.batch_decode(responses, skip_special_tokens=True)
        run.save_table(
            "responses", pd.DataFrame({"prompt": scorer.texts, "response_ids": responses, "response": decoded})
        )
    behaviour = BehaviourScorer(scorer.pair, scorer.texts, responses, cfg.batch_size, cfg.min_relative_gap)
    run.update_record(
        behaviour={
            "responses_sha256": behaviour.responses_sha256,
            "response_tokens": cfg.response_tokens,
            "n_excluded": behaviour.n_excluded,
        }
    )
    return behaviour


def scoring_objective(cfg: ScreenConfig | TraceConfig, run: RunDir, scorer: AnchorScorer) -> GapScorer:
    """What the stage scores by (``cfg.objective``): ``scorer`` itself, or the behaviour objective on its
    prompts. One objective per run directory (score rows carry no objective column): a run directory
    that holds scores under the other objective is refused, naming the fix."""
    record = run.record() or {}
    recorded = record.get("objective") or (record.get("screening") or {}).get("objective")
    if recorded is not None and recorded != cfg.objective:
        raise WeightPatchError(
            f"{run.path} holds scores under the {recorded} objective; run with --objective {recorded}, "
            f"or give the {cfg.objective} objective another --run-dir"
        )
    run.update_record(objective=cfg.objective)
    return behaviour_scorer(cfg, run, scorer) if cfg.objective == "behaviour" else scorer


@contextmanager
def scoring_run(
    cfg: ScreenConfig | TraceConfig, command: str, pair: ModelPair | None, names: Sequence[str] = ()
) -> Iterator[tuple[RunDir, AnchorScorer]]:
    """The opened run directory and the scorer of a scoring stage (screen, trace): prompts selected and
    rendered, the anchor loaded and checked against the pair, component ``names`` validated before
    anything is written."""
    records = select_prompts(cfg, cfg.seed)
    pair = pair_for(cfg, pair)
    for name in names:
        pair.space.parse(name)
    if isinstance(cfg, ScreenConfig):
        pair.space.check_kinds(cfg.kinds)
    anchor, sha = load_anchor(cfg, cfg.anchor, pair)
    with open_run(cfg, command, pair, [cfg.base, cfg.specialized, cfg.prompts], anchor_sha256=sha) as run:
        texts = render(pair, [r.prompt for r in records], cfg)
        logger.info("scoring base and specialized on %d prompts", len(texts))
        scorer = AnchorScorer(
            pair, anchor, texts, cfg.batch_size, cfg.min_relative_gap, truncate_prompts=cfg.truncate_prompts
        )
        gradient = isinstance(cfg, ScreenConfig) and cfg.method in ("first_order", "integrated_gradients")
        if (warning := roundoff_warning(scorer, exact=not gradient)) is not None:
            logger.warning("%s", warning, extra=CONSOLE)
        yield run, scorer
