"""Where sweeps run: in this process (``local``) or sharded over a Ray cluster (``ray``).

A backend turns a picklable :class:`JobSpec` (where the two models are, how to load them, the
anchor, the prompt texts, the scorer options) and a list of component names into exact scores,
handed to a callback shard by shard as they finish, skipping names already done::

    from weightpatch.backends import JobSpec, make_backend

    job = JobSpec(base="base-dir", specialized="sft-dir", anchor="run/anchor", texts=texts)
    with make_backend("ray", job, workers=4) as backend:
        table = backend.run(names, skip=run.done("exact"), on_result=run.append_scores)

Both backends score the same shards with the same code (:func:`score_shard`): the component list
is split into small shards of one layer each, scored by the strategy of the job's sweep method
(``JobSpec.method``, any sweep method of :mod:`weightpatch.methods`; exact by default, whose MLP
neurons go in larger per-layer chunks to :class:`~weightpatch.screening.neurons.NeuronScreen`).
Results are keyed by component name: every component reaches the callback at most once, even when
a shard is scored twice (a Ray worker that died after finishing its work, a re-run).
"""

from __future__ import annotations

from weightpatch.backends.local import Backend, JobSpec, LocalBackend, WorkerState, dedupe_rows, score_shard
from weightpatch.backends.shards import Shard, plan_shards

BACKENDS = ("local", "ray")


def make_backend(name: str, job: JobSpec, **options) -> Backend:
    """``local`` (options: ``shard_size``, ``neuron_shard_size``) or ``ray`` (see
    :class:`~weightpatch.backends.ray_backend.RayBackend`: ``address``, ``workers``, ``num_cpus``,
    ``num_gpus``, ...)."""
    from weightpatch.errors import WeightPatchError

    if name == "local":
        return LocalBackend(job, **options)
    if name == "ray":
        from weightpatch.backends.ray_backend import RayBackend

        return RayBackend(job, **options)
    raise WeightPatchError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "Backend",
    "JobSpec",
    "LocalBackend",
    "Shard",
    "WorkerState",
    "dedupe_rows",
    "make_backend",
    "plan_shards",
    "score_shard",
]
