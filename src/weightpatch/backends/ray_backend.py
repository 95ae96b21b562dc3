"""Exact sweeps sharded over Ray actors (``pip install 'weightpatch[ray]'``).

Each actor opens the :class:`~weightpatch.backends.local.JobSpec` once (loads the pair, the
anchor, scores base and specialized, caches the block inputs) on its own CPU/GPU slot, then scores
shards submitted to it one at a time. The driver keeps every actor busy, collects finished shards
with ``ray.wait`` as they come and hands their rows to the caller's callback (which appends them
to the run directory), deduplicated by component name.

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

from weightpatch.backends.local import (
    DEFAULT_NEURON_SHARD_SIZE,
    DEFAULT_SHARD_SIZE,
    JobSpec,
    OnResult,
    Shard,
    dedupe_rows,
    plan_shards,
    score_shard,
)
from weightpatch.components import Component
from weightpatch.errors import WeightPatchError
from weightpatch.results import ScoreTable

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

    def score(self, shard: Shard) -> tuple[int, list[dict]]:
        _maybe_crash()
        return shard.index, score_shard(self.state, shard).frame.to_dict("records")


class RayBackend:
    """Shard the components over a pool of Ray actors.

    ``address``: a Ray cluster to connect to (``"auto"``, ``"ray://host:10001"``, ...); None uses
    the running Ray instance of this process or starts a local one (shut down by :meth:`close`).
    ``workers``: actors in the pool (default: as many as the cluster's CPUs (GPUs with
    ``num_gpus``) allow, at most one per shard). ``num_cpus``/``num_gpus``: resources per actor;
    torch in each actor uses ``num_cpus`` threads. ``max_retries``: re-submissions of a shard whose
    worker died. ``runtime_env``: passed to every actor (e.g. ``{"env_vars": {...}}``)."""

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
        self.timings: dict[str, float] = {"start_workers_s": 0.0, "run_s": 0.0}

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
            self.timings["start_workers_s"] += time.perf_counter() - start
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
        queue: deque[Shard] = deque(shards)
        idle = deque(self._pool)
        pending: dict[Any, tuple[Any, Shard]] = {}
        failures: Counter[int] = Counter()
        tables: list[ScoreTable] = []
        bar = tqdm(total=sum(map(len, shards)), desc="exact (ray)", unit="comp", disable=not progress)
        try:
            while queue or pending:
                while idle and queue:
                    actor, shard = idle.popleft(), queue.popleft()
                    pending[actor.score.remote(shard)] = (actor, shard)
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    actor, shard = pending.pop(ref)
                    try:
                        _, rows = ray.get(ref)
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
                    fresh = dedupe_rows(ScoreTable.from_rows(rows) if rows else _empty(), done)
                    if len(fresh):
                        tables.append(fresh)
                        if on_result:
                            on_result(fresh)
                    bar.update(len(shard))
                    idle.append(actor)
        finally:
            bar.close()
            self.timings["run_s"] += time.perf_counter() - started
            for actor, _ in pending.values():  # interrupted: in-flight work is abandoned
                self._drop(ray, actor)
        return ScoreTable.concat(tables)

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
