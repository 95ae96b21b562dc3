"""The Ray backend on a local two-CPU cluster: same scores as the local backend, every component
exactly once, also when a worker dies mid-run. Slow (Ray and its worker processes start)."""

import logging

import pytest
import torch

from conftest import tiny_texts
from weightpatch.anchors import build_anchor
from weightpatch.backends import JobSpec, LocalBackend
from weightpatch.pair import load_pair

ray = pytest.importorskip("ray")
from weightpatch.backends.ray_backend import CRASH_ONCE_ENV, RayBackend  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(llama_pair_dirs, tmp_path_factory):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    stem = anchor.save(tmp_path_factory.mktemp("anchor") / "anchor")
    texts = tiny_texts(6, 4)
    return JobSpec(*map(str, llama_pair_dirs), anchor=str(stem), texts=texts, batch_size=4, min_relative_gap=0.0)


@pytest.fixture(scope="module")
def names(job):
    space = load_pair(job.base, job.specialized).space
    return [c.name for c in space.components(kinds=("layer", "module", "head"))] + [
        f"L{layer}.mlp.neuron{j}" for layer in (0, 1) for j in range(0, 48, 3)
    ]


@pytest.fixture(scope="module")
def local_scores(job, names):
    return LocalBackend(job, shard_size=4, neuron_shard_size=8).run(names, progress=False).frame.set_index("component")


def assert_same(table, local_scores):
    ours = table.frame.set_index("component")
    assert ours.index.is_unique and set(ours.index) == set(local_scores.index)
    torch.testing.assert_close(
        torch.tensor(ours.loc[local_scores.index, "score"].values),
        torch.tensor(local_scores["score"].values),
        atol=1e-5,
        rtol=1e-4,
    )


def test_ray_backend_equals_local_backend_and_streams_shards(cluster, job, names, local_scores, caplog):
    """Also: calibration units go first and the sweep's estimate is logged per engine (worker time)
    and for the pool (wall time); every shard scored is timed once."""
    streamed = []
    skip = set(names[:5])
    with (
        caplog.at_level(logging.INFO, logger="weightpatch"),
        RayBackend(job, workers=2, shard_size=4, neuron_shard_size=8) as backend,
    ):
        table = backend.run(names, skip=skip, on_result=streamed.append, progress=False)
        assert len(backend._pool) == 2
        assert backend.restarts == 0
    got = [n for t in streamed for n in t.frame["component"]]
    assert sorted(got) == sorted(set(names) - skip) and len(streamed) > 4
    assert_same(table, local_scores.drop(index=list(skip)))

    space = load_pair(job.base, job.specialized).space
    todo = [n for n in names if n not in skip]
    reach = [n for n in todo if space.first_affected_layer(n) <= 2]  # the anchor layer
    by_engine = {e.engine: e for e in backend.estimates}
    assert set(by_engine) == {"neuron", "component"}
    neurons = by_engine["neuron"]
    assert neurons.n_components == sum(".neuron" in n for n in reach) == 32
    assert neurons.layers == (0, 1) and neurons.calibration_layers == (0, 1) and neurons.calibration_n == 16
    assert by_engine["component"].n_components == sum(".neuron" not in n for n in reach)
    assert all(e.seconds >= e.calibration_seconds > 0 for e in backend.estimates)
    timed = [n for shard, _, seconds in backend.timings for n in shard.names if seconds > 0]
    assert sorted(timed) == sorted(todo)
    assert "exact neuron sweep: 32 neurons in 2 layers, estimated" in caplog.text
    assert "calibrated on 16 neurons at layers 0, 1" in caplog.text and "of worker time" in caplog.text
    assert "exact sweep on 2 Ray workers: about" in caplog.text and "exact sweep on Ray: took" in caplog.text
    assert backend.wall_estimate > 0


def test_a_worker_dying_mid_run_loses_nothing_and_counts_nothing_twice(cluster, job, names, local_scores, tmp_path):
    marker = tmp_path / "crashed"
    streamed = []
    env = {"env_vars": {CRASH_ONCE_ENV: str(marker)}}
    with RayBackend(job, workers=2, shard_size=4, neuron_shard_size=8, runtime_env=env) as backend:
        table = backend.run(names, on_result=streamed.append, progress=False)
        restarts = backend.restarts
    assert marker.is_file()  # a worker really exited on its first shard
    assert restarts == 1
    got = [n for t in streamed for n in t.frame["component"]]
    assert len(got) == len(set(got)) == len(names)
    assert_same(table, local_scores)


def test_job_that_cannot_load_fails_with_its_own_message(cluster, job, tmp_path):
    from dataclasses import replace

    from weightpatch.errors import WeightPatchError

    bad = replace(job, anchor=str(tmp_path / "missing"))
    with pytest.raises(WeightPatchError, match=r"could not load the job.*anchor"), RayBackend(bad, workers=1) as b:
        b.run(["L0.mlp"], progress=False)
