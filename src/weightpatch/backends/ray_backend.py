"""Exact sweeps sharded over Ray actors (``pip install 'weightpatch[ray]'``).

Each actor opens the :class:`~weightpatch.backends.local.JobSpec` once (loads the pair, the
anchor, scores base and specialized, caches the block inputs) on its own CPU/GPU slot, then scores
shards submitted to it one at a time. The driver keeps every actor busy, collects finished shards
with ``ray.wait`` as they come and hands their rows to the caller's callback (which appends them
to the run directory), deduplicated by component name.

Before the rest, a few calibration units are submitted (as in the local backend,
:mod:`weightpatch.backends.estimate`); once they are back, the estimated duration of each engine's
part is logged in worker time and as wall time on the pool, while the other shards already run.

A worker that dies (process killed, node lost, out of memory) loses only its in-flight shard: the
actor is replaced by a fresh one and the shard is submitted again, up to ``max_retries`` times per
shard. An exception raised by the scoring code itself is not retried (it would fail again); it is
raised in the driver. Model paths and the anchor path must be readable from every node (or use hub
ids, and pass the :class:`~weightpatch.anchors.Anchor` itself in the job).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Any

from tqdm.auto import tqdm

from weightpatch.backends.estimate import (
    SweepEstimate,
    Work,
    calibration_units,
    fit_estimates,
    format_duration,
    outcome_message,
    shard_work,
    split_for_calibration,
)
from weightpatch.backends.local import JobSpec, OnResult, dedupe_rows, score_shard
from weightpatch.backends.shards import DEFAULT_NEURON_SHARD_SIZE, DEFAULT_SHARD_SIZE, Shard, plan_shards
from weightpatch.components import Component
from weightpatch.errors import WeightPatchError
from weightpatch.results import ScoreTable
from weightpatch.rundir import CONSOLE

logger = logging.getLogger("weightpatch")

# Test hook: when a worker has this variable set to a file path, the first worker to start a
# shard creates that file and exits its process at once (os._exit), as a crash would.
CRASH_ONCE_ENV = "WEIGHTPATCH_TEST_CRASH_ONCE"


def require_ray():
    try:
        import ray
    except ImportError as exc:
        raise WeightPatchError(
            "the ray backend needs Ray, which is not installed: pip install 'weightpatch[ray]' (or use --backend local)"
        ) from exc
    return ray


def _maybe_crash() -> None:
    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(1)


class ShardWorker:
    """The actor: one loaded job, scoring one shard at a time."""

    def __init__(self, job: JobSpec, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.state = job.open()

    def ready(self) -> int:
        return os.getpid()

    def works(self, shards: Sequence[Shard]) -> tuple[int, list[Work]]:
        """The anchor layer and what each shard costs (the driver holds no model to tell)."""
        scorer = self.state.scorer
        return scorer.stop, [shard_work(scorer.pair.space, scorer.stop, s) for s in shards]

    def score(self, shard: Shard) -> tuple[int, list[dict], float]:
        """The shard's rows and the seconds this worker spent scoring them."""
        _maybe_crash()
        start = time.perf_counter()
        rows = score_shard(self.state, shard).frame.to_dict("records")
        return shard.index, rows, time.perf_counter() - start


class RayBackend:
    """Shard the components over a pool of Ray actors.

    ``address``: a Ray cluster to connect to (``"auto"``, ``"ray://host:10001"``, ...); None uses
    the running Ray instance of this process or starts a local one (shut down by :meth:`close`).
    ``workers``: actors in the pool (default: as many as the cluster's CPUs (GPUs with
    ``num_gpus``) allow, at most one per shard). ``num_cpus``/``num_gpus``: resources per actor;
    torch in each actor uses ``num_cpus`` threads. ``max_retries``: re-submissions of a shard whose
    worker died. ``runtime_env``: passed to every actor (e.g. ``{"env_vars": {...}}``).
    ``estimate``: calibrate first and log the sweep's estimated duration (``estimates``);
    ``timings`` of the last run hold (shard, work, worker seconds) of every shard scored."""

    def __init__(
        self,
        job: JobSpec,
        *,
        address: str | None = None,
        workers: int | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        shard_size: int = DEFAULT_SHARD_SIZE,
        neuron_shard_size: int = DEFAULT_NEURON_SHARD_SIZE,
        max_retries: int = 3,
        runtime_env: dict[str, Any] | None = None,
        init_options: dict[str, Any] | None = None,
        estimate: bool = True,
    ) -> None:
        require_ray()
        if workers is not None and workers < 1:
            raise WeightPatchError("--workers must be at least 1")
        self.job, self.address, self.workers = job, address, workers
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.shard_size, self.neuron_shard_size = shard_size, neuron_shard_size
        self.max_retries, self.runtime_env = max_retries, runtime_env
        self.init_options = init_options or {}
        self._started_ray = False
        self._pool: list[Any] = []
        self.restarts = 0  # workers replaced after dying (over this backend's life)
        self.durations: dict[str, float] = {"start_workers_s": 0.0, "run_s": 0.0}
        self.estimate = estimate
        self.estimates: list[SweepEstimate] = []
        self.wall_estimate = 0.0  # seconds, the whole last run on the pool (0: not estimated)
        self.timings: list[tuple[Shard, Work, float]] = []

    # ---- cluster and actors ------------------------------------------------------------------
    def _connect(self):
        ray = require_ray()
        if not ray.is_initialized():
            options = {"include_dashboard": False, "logging_level": logging.WARNING, **self.init_options}
            try:
                ray.init(address=self.address, **options)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise WeightPatchError(f"cannot start or reach Ray at {self.address or 'local'}: {exc}") from exc
            self._started_ray = True
        return ray

    def _n_workers(self, ray, n_shards: int) -> int:
        if self.workers is not None:
            return max(1, min(self.workers, n_shards))
        resources = ray.cluster_resources()
        if self.num_gpus:
            slots = int(resources.get("GPU", 0) // self.num_gpus)
        else:
            slots = int(resources.get("CPU", 1) // max(self.num_cpus, 1e-9))
        return max(1, min(slots, n_shards))

    def _new_actor(self, ray):
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_restarts": 0}
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        cls = ray.remote(ShardWorker).options(**options)
        return cls.remote(self.job, max(1, int(self.num_cpus)))

    def _fill_pool(self, ray, n: int) -> None:
        """Start actors up to ``n`` and wait until each has loaded the job, so that a job that
        cannot load (bad path, anchor of another pair) fails at once with its own message."""
        new = [self._new_actor(ray) for _ in range(n - len(self._pool))]
        if not new:
            return
        start = time.perf_counter()
        try:
            ray.get([a.ready.remote() for a in new])
            self.durations["start_workers_s"] += time.perf_counter() - start
        except ray.exceptions.RayError as exc:
            for a in new:
                ray.kill(a, no_restart=True)
            raise WeightPatchError(f"a Ray worker could not load the job: {_short(exc)}") from exc
        self._pool += new

    def _drop(self, ray, actor) -> None:
        if actor in self._pool:
            self._pool.remove(actor)
        with contextlib.suppress(Exception):  # already gone
            ray.kill(actor, no_restart=True)

    # ---- running -----------------------------------------------------------------------------
    def run(
        self,
        components: Sequence[Component | str],
        skip: Iterable[str] | None = None,
        on_result: OnResult | None = None,
        progress: bool = True,
    ) -> ScoreTable:
        done = set(skip or ())
        shards = plan_shards(components, done, self.shard_size, self.neuron_shard_size)
        if not shards:
            return ScoreTable.from_rows([])
        ray = self._connect()
        started = time.perf_counter()
        self._fill_pool(ray, self._n_workers(ray, len(shards)))
        self.estimates, self.timings = [], []
        calibration: list[Shard] = []
        rest: list[tuple[Shard, Work]] = []
        work_of: dict[Shard, Work] = {}
        anchor = -1
        if self.estimate:
            planner = self._pool[0]
            anchor, works = ray.get(planner.works.remote(shards))
            neurons = self.job.neurons_per_forward if self.job.neuron_sweep and self.job.method == "exact" else None
            units = calibration_units(self.job.variants_per_batch, neurons)
            calibration, shards = split_for_calibration(shards, works, units)
            _, after = ray.get(planner.works.remote(calibration + shards))  # the split shards' own works
            work_of = dict(zip(calibration + shards, after, strict=True))
            rest = [(s, work_of[s]) for s in shards]
        waiting = set(calibration)  # calibration units not back yet
        queue: deque[Shard] = deque(calibration + shards)
        idle = deque(self._pool)
        pending: dict[Any, tuple[Any, Shard]] = {}
        failures: Counter[int] = Counter()
        tables: list[ScoreTable] = []
        bar = tqdm(total=sum(map(len, queue)), desc="exact (ray)", unit="comp", disable=not progress)
        try:
            while queue or pending:
                while idle and queue:
                    actor, shard = idle.popleft(), queue.popleft()
                    pending[actor.score.remote(shard)] = (actor, shard)
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    actor, shard = pending.pop(ref)
                    try:
                        _, rows, seconds = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # our code raised: retrying would not help
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, WeightPatchError):
                            raise WeightPatchError(str(cause)) from exc
                        raise
                    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                        failures[shard.index] += 1
                        self._drop(ray, actor)
                        if failures[shard.index] > self.max_retries:
                            raise WeightPatchError(
                                f"shard {shard.index} ({shard.names[0]}..., {len(shard)} components) lost its "
                                f"worker {failures[shard.index]} times; giving up: {_short(exc)}"
                            ) from exc
                        logger.warning(
                            "Ray worker died while scoring %s...; re-submitting %d components to a fresh worker",
                            shard.names[0],
                            len(shard),
                        )
                        self.restarts += 1
                        queue.appendleft(shard)
                        idle.append(self._new_actor(ray))
                        self._pool.append(idle[-1])
                        continue
                    if self.estimate:
                        self.timings.append((shard, work_of[shard], seconds))
                        waiting.discard(shard)
                        if calibration and not waiting and not self.estimates:
                            self._log_estimates(anchor, rest, time.perf_counter() - started)
                    fresh = dedupe_rows(ScoreTable.from_rows(rows) if rows else _empty(), done)
                    if len(fresh):
                        tables.append(fresh)
                        if on_result:
                            on_result(fresh)
                    bar.update(len(shard))
                    idle.append(actor)
        finally:
            bar.close()
            self.durations["run_s"] += time.perf_counter() - started
            for actor, _ in pending.values():  # interrupted: in-flight work is abandoned
                self._drop(ray, actor)
        for estimate in self.estimates:
            logger.info("%s", outcome_message(estimate, self.timings) + " of worker time", extra=CONSOLE)
        if self.estimates:
            logger.info(
                "exact sweep on Ray: took %s wall time (estimated %s)",
                format_duration(time.perf_counter() - started),
                format_duration(self.wall_estimate),
                extra=CONSOLE,
            )
        return ScoreTable.concat(tables)

    def _log_estimates(self, anchor: int, rest: list[tuple[Shard, Work]], elapsed: float) -> None:
        """Fit each engine's cost on the calibration timings, log its estimate in worker time and
        the whole sweep's wall time: ``elapsed`` so far plus the remaining worker time spread over
        the pool."""
        self.estimates = fit_estimates(anchor, self.timings, rest, self.job.method)
        for estimate in self.estimates:
            logger.info("%s of worker time", estimate.message(), extra=CONSOLE)
        remaining = sum(e.seconds - e.calibration_seconds for e in self.estimates)
        workers = len(self._pool)
        self.wall_estimate = elapsed + remaining / workers
        logger.info(
            "exact sweep on %d Ray worker%s: about %s wall time in all",
            workers,
            "s" if workers != 1 else "",
            format_duration(self.wall_estimate),
            extra=CONSOLE,
        )

    def close(self) -> None:
        if self._pool:
            ray = require_ray()
            for actor in list(self._pool):
                self._drop(ray, actor)
        if self._started_ray:
            require_ray().shutdown()
            self._started_ray = False

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _empty() -> ScoreTable:
    return ScoreTable.from_rows([])


def _short(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    tail = [line for line in lines if "Error" in line][-1:] or lines[-1:]
    return " ".join(" ".join(tail).split())[:300]
