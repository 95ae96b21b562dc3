"""The job description and the in-process (``local``) backend (shards: :mod:`weightpatch.backends.shards`).

Everything a worker needs to score components is in a :class:`JobSpec`: plain strings and numbers
(plus, optionally, the :class:`~weightpatch.anchors.Anchor` itself), so it pickles to any process
or machine. A worker opens it once (:meth:`JobSpec.open`: load the pair, the anchor, score base
and specialized on the prompts, cache the block inputs) and then scores shard after shard.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from weightpatch.anchors import Anchor
from weightpatch.backends.estimate import (
    SweepEstimate,
    Work,
    calibration_units,
    fit_estimates,
    outcome_message,
    shard_work,
    split_for_calibration,
)
from weightpatch.backends.shards import DEFAULT_NEURON_SHARD_SIZE, DEFAULT_SHARD_SIZE, Shard, plan_shards
from weightpatch.components import Component
from weightpatch.engine import EffectStrategy
from weightpatch.errors import WeightPatchError
from weightpatch.methods import scoring_method
from weightpatch.results import ScoreTable
from weightpatch.rundir import CONSOLE
from weightpatch.scoring import AnchorScorer, GapScorer
from weightpatch.screening.neurons import NeuronScreen

logger = logging.getLogger("weightpatch")


@dataclass(frozen=True, eq=False)
class JobSpec:
    """What to score, picklable: the models (paths or hub ids, readable from every worker), how to
    load them, the anchor (a path stem readable from every worker, or the :class:`Anchor`
    itself), the prompt texts as the model sees them (chat template already applied) and the
    scorer options. ``device`` is as seen by a worker (with Ray GPUs, ``cuda`` is the worker's own
    GPU); ``device_map`` / ``max_memory`` place each worker's receiver across its devices with
    accelerate, as :func:`~weightpatch.pair.load_pair` does (``"auto"``: over the GPUs a worker was
    given, then its CPU)."""

    base: str
    specialized: str
    anchor: str | Anchor
    texts: tuple[str, ...]
    receiver: str = "base"
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | dict[str, Any] | None = None
    max_memory: Mapping[int | str, int | str] | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    include_kv: bool = False
    batch_size: int = 16
    min_relative_gap: float = 0.1
    variants_per_batch: int = 8
    neurons_per_forward: int = 64
    neuron_sweep: bool = True  # exact: neurons through NeuronScreen (all of a chunk per forward)
    method: str = "exact"  # a sweep method of the registry (weightpatch.methods): what the shards are scored by
    options: dict[str, Any] = field(default_factory=dict)  # the method's options beyond its defaults
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, e.g. for test hooks

    def __post_init__(self) -> None:
        if isinstance(self.texts, str):
            raise WeightPatchError("JobSpec.texts must be a sequence of prompt texts, not one string")
        object.__setattr__(self, "texts", tuple(self.texts))
        if not isinstance(self.anchor, Anchor):
            object.__setattr__(self, "anchor", os.fspath(self.anchor))
        object.__setattr__(self, "base", os.fspath(self.base))
        object.__setattr__(self, "specialized", os.fspath(self.specialized))

    def open(self) -> WorkerState:
        """Load the pair, the anchor and the scorer (the expensive part; once per worker)."""
        from weightpatch.pair import load_pair

        torch.manual_seed(self.seed)
        pair = load_pair(
            self.base,
            self.specialized,
            receiver=self.receiver,  # type: ignore[arg-type]
            dtype=self.dtype,
            device=self.device,
            device_map=self.device_map,
            max_memory=self.max_memory,
            trust_remote_code=self.trust_remote_code,
            revision=self.revision,
            include_kv=self.include_kv,
        )
        if isinstance(self.anchor, Anchor):
            anchor = self.anchor
            anchor.check_compatible(pair)
        else:
            anchor = Anchor.load(self.anchor, pair)
        scorer = AnchorScorer(pair, anchor, list(self.texts), self.batch_size, self.min_relative_gap)
        return WorkerState.from_scorer(
            scorer, self.variants_per_batch, self.neurons_per_forward, self.neuron_sweep, self.method, self.options
        )


@dataclass
class WorkerState:
    """A loaded job: the scorer and the strategy of its sweep method (its cached block inputs) of
    one worker; ``neurons``: exact neuron shards go through the batched neuron strategy."""

    scorer: GapScorer
    strategy: EffectStrategy
    neurons: NeuronScreen | None

    @classmethod
    def from_scorer(
        cls,
        scorer: GapScorer,
        variants_per_batch: int = 8,
        neurons_per_forward: int = 64,
        neuron_sweep: bool = True,
        method: str = "exact",
        options: dict[str, Any] | None = None,
    ) -> WorkerState:
        strategy = scoring_method(method).build(scorer, variants_per_batch=variants_per_batch, **(options or {}))
        neurons = NeuronScreen(scorer, neurons_per_forward) if neuron_sweep and method == "exact" else None
        return cls(scorer, strategy, neurons)


def score_shard(state: WorkerState, shard: Shard) -> ScoreTable:
    """Scores of one shard by the worker's method (one row per component, keyed by its canonical name)."""
    strategy = state.neurons if shard.neurons and state.neurons is not None else state.strategy
    return strategy.score(shard.names, progress=False)


def dedupe_rows(table: ScoreTable, done: set[str]) -> ScoreTable:
    """The rows of ``table`` whose component is not in ``done`` (first occurrence only); ``done``
    is updated with them."""
    frame = table.frame
    keep = ~frame["component"].isin(done) & ~frame["component"].duplicated()
    fresh = ScoreTable(frame[keep].reset_index(drop=True))
    done.update(fresh.frame["component"])
    return fresh


OnResult = Callable[[ScoreTable], None]


class Backend(Protocol):
    """Scores components exactly; ``on_result`` gets each finished shard's new rows."""

    def run(
        self,
        components: Sequence[Component | str],
        skip: Iterable[str] | None = None,
        on_result: OnResult | None = None,
        progress: bool = True,
    ) -> ScoreTable: ...

    def close(self) -> None: ...

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: object) -> None: ...


class LocalBackend:
    """In this process, shard after shard. Give a :class:`JobSpec` (opened on the first run) or
    an already built ``state`` (:meth:`from_scorer`, e.g. the CLI's scorer).

    With ``estimate``, a run first scores a few calibration units (see
    :mod:`weightpatch.backends.estimate`), logs the estimated duration of each engine's part
    (``estimates``), then the rest; ``timings`` holds (shard, work, seconds) of every piece run,
    timed by ``clock`` (seconds)."""

    def __init__(
        self,
        job: JobSpec | None = None,
        *,
        state: WorkerState | None = None,
        shard_size: int = DEFAULT_SHARD_SIZE,
        neuron_shard_size: int = DEFAULT_NEURON_SHARD_SIZE,
        estimate: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if job is None and state is None:
            raise WeightPatchError("LocalBackend needs a JobSpec or a WorkerState")
        self.job, self._state = job, state
        self.shard_size, self.neuron_shard_size = shard_size, neuron_shard_size
        self.estimate, self.clock = estimate, clock
        self.estimates: list[SweepEstimate] = []
        self.timings: list[tuple[Shard, Work, float]] = []

    @classmethod
    def from_scorer(
        cls,
        scorer: GapScorer,
        variants_per_batch: int = 8,
        neurons_per_forward: int = 64,
        neuron_sweep: bool = True,
        *,
        method: str = "exact",
        method_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> LocalBackend:
        """A backend on an already built scorer, scoring by the sweep ``method`` of the registry
        (its ``method_options`` beyond the defaults); ``options``: the backend's own."""
        state = WorkerState.from_scorer(
            scorer, variants_per_batch, neurons_per_forward, neuron_sweep, method, method_options
        )
        return cls(state=state, **options)

    @property
    def state(self) -> WorkerState:
        if self._state is None:
            self._state = self.job.open()  # type: ignore[union-attr]
        return self._state

    def run(
        self,
        components: Sequence[Component | str],
        skip: Iterable[str] | None = None,
        on_result: OnResult | None = None,
        progress: bool = True,
    ) -> ScoreTable:
        done = set(skip or ())
        shards = plan_shards(components, done, self.shard_size, self.neuron_shard_size)
        self.estimates, self.timings = [], []
        if not shards:
            return ScoreTable.from_rows([])
        space, anchor = self.state.scorer.pair.space, self.state.scorer.stop
        calibration: list[Shard] = []
        if self.estimate:
            state = self.state
            neurons = state.neurons.neurons_per_forward if state.neurons is not None else None
            calibration, shards = split_for_calibration(
                shards,
                [shard_work(space, anchor, s) for s in shards],
                calibration_units(state.strategy.variants_per_batch, neurons),
            )
        tables = []
        method = self.state.strategy.method
        bar = tqdm(total=sum(map(len, calibration + shards)), desc=method, unit="comp", disable=not progress)
        for i, shard in enumerate(calibration + shards):
            if i == len(calibration) and calibration:
                self._log_estimates(anchor, [(s, shard_work(space, anchor, s)) for s in shards])
            start = self.clock()
            fresh = dedupe_rows(score_shard(self.state, shard), done)
            if len(fresh):
                tables.append(fresh)
                if on_result:
                    on_result(fresh)
            self.timings.append((shard, shard_work(space, anchor, shard), self.clock() - start))
            bar.update(len(shard))
        bar.close()
        if calibration and not shards:
            self._log_estimates(anchor, [])
        for estimate in self.estimates:
            logger.info("%s", outcome_message(estimate, self.timings), extra=CONSOLE)
        return ScoreTable.concat(tables) if tables else ScoreTable.from_rows([])

    def _log_estimates(self, anchor: int, rest: list[tuple[Shard, Work]]) -> None:
        """Fit each engine's cost on the calibration timings so far and log its estimate."""
        for estimate in fit_estimates(anchor, self.timings, rest, self.state.strategy.method):
            self.estimates.append(estimate)
            logger.info("%s", estimate.message(), extra=CONSOLE)

    def close(self) -> None:
        self._state = None if self.job is not None else self._state

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
