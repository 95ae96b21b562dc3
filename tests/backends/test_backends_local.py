"""Backend plumbing without Ray: shard planning, dedup, the local backend, clear errors."""

import sys

import pytest
import torch

from conftest import tiny_texts
from weightpatch.anchors import build_anchor
from weightpatch.backends import JobSpec, LocalBackend, Shard, dedupe_rows, make_backend, plan_shards
from weightpatch.components import Component
from weightpatch.errors import WeightPatchError
from weightpatch.pair import load_pair
from weightpatch.results import ScoreTable, score_row
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import plain_exact_scores


def test_plan_shards_groups_by_layer_skips_done_and_duplicates():
    names = ["L1.attn.head0", "L0.mlp", "embed", "L1.attn.head1", "L1.attn.head2", "L0.mlp", "L1.mlp"]
    names += [f"L0.mlp.neuron{j}" for j in range(5)] + ["L1.attn.head3", "norm.final"]
    shards = plan_shards(names, skip={"L1.mlp", "L0.mlp.neuron4"}, shard_size=2, neuron_shard_size=3)
    assert [s.index for s in shards] == list(range(len(shards)))
    flat = [n for s in shards for n in s.names]
    assert sorted(flat) == sorted(set(names) - {"L1.mlp", "L0.mlp.neuron4"})  # each once, none skipped
    for s in shards:
        parsed = [Component.parse(n) for n in s.names]
        assert {c.layer for c in parsed} == {s.layer}
        assert all((c.kind == "neuron") == s.neurons for c in parsed)
        assert len(s) <= (3 if s.neurons else 2)
    assert shards[0] == Shard(0, None, ("embed", "norm.final"))  # model-level first, given order kept
    assert [s.names for s in shards if s.neurons] == [
        ("L0.mlp.neuron0", "L0.mlp.neuron1", "L0.mlp.neuron2"),
        ("L0.mlp.neuron3",),
    ]
    layer1 = [s.names for s in shards if s.layer == 1]
    assert layer1 == [("L1.attn.head0", "L1.attn.head1"), ("L1.attn.head2", "L1.attn.head3")]
    assert plan_shards(names, skip=names) == []
    with pytest.raises(WeightPatchError):
        plan_shards(names, shard_size=0)


def test_dedupe_rows_keeps_first_of_each_name_and_updates_done():
    rows = [score_row(Component.parse(n), "exact", s, 0.0, 3) for n, s in [("L0", 1.0), ("L1", 2.0), ("L0", 9.0)]]
    done = {"L1"}
    fresh = dedupe_rows(ScoreTable.from_rows(rows), done)
    assert fresh.frame[["component", "score"]].values.tolist() == [["L0", 1.0]]
    assert done == {"L0", "L1"}
    assert len(dedupe_rows(ScoreTable.from_rows(rows), done)) == 0  # delivered twice: counted once


@pytest.fixture(scope="module")
def job(llama_pair_dirs, tmp_path_factory):
    pair = load_pair(*llama_pair_dirs)
    anchor = build_anchor(pair, tiny_texts(6), None, layer=2, method="model_diff")
    stem = anchor.save(tmp_path_factory.mktemp("anchor") / "anchor")
    texts = tiny_texts(6, 4)
    return JobSpec(*map(str, llama_pair_dirs), anchor=str(stem), texts=texts, batch_size=4, min_relative_gap=0.0)


def test_local_backend_streams_each_component_once_and_matches_plain_scores(job):
    names = ["embed", "L0.mlp", "L0.attn.head1", "L1.attn", "L2.mlp.up", "L2", "norm.final"]
    names += [f"L1.mlp.neuron{j}" for j in range(6)]
    streamed = []
    with make_backend("local", job, shard_size=2, neuron_shard_size=4) as backend:
        table = backend.run([*names, "L0.mlp"], skip={"L1.attn"}, on_result=streamed.append, progress=False)
        scorer = backend.state.scorer
    got = [n for t in streamed for n in t.frame["component"]]
    assert sorted(got) == sorted(set(names) - {"L1.attn"})
    assert len(streamed) > 3  # one callback per shard
    plain = plain_exact_scores(scorer, [n for n in names if n != "L1.attn"]).frame.set_index("component")
    ours = table.frame.set_index("component")
    assert ours["score"].abs().max() > 1e-3
    torch.testing.assert_close(
        torch.tensor(ours.loc[plain.index, "score"].values), torch.tensor(plain["score"].values), atol=1e-4, rtol=1e-3
    )


def test_local_backend_from_an_existing_scorer(llama_pair_dirs, job):
    pair = load_pair(*llama_pair_dirs)
    scorer = AnchorScorer(pair, job.open().scorer.anchor, list(job.texts), batch_size=4, min_relative_gap=0.0)
    backend = LocalBackend.from_scorer(scorer, variants_per_batch=3, neuron_sweep=False)
    table = backend.run(["L0.mlp.neuron0", "L1.attn.head0"], progress=False)
    assert table.components() == ["L0.mlp.neuron0", "L1.attn.head0"]


def test_bad_names_and_backends_fail_clearly(job, monkeypatch):
    with pytest.raises(WeightPatchError, match="unknown backend"):
        make_backend("dask", job)
    with pytest.raises(WeightPatchError, match="L9"):
        LocalBackend(job).run(["L9.mlp"], progress=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(WeightPatchError, match=r"weightpatch\[ray\]"):
        make_backend("ray", job)


def test_job_spec_pickles_with_an_anchor_object(job):
    import pickle

    from weightpatch.anchors import Anchor

    spec = JobSpec(job.base, job.specialized, Anchor.load(job.anchor), job.texts, batch_size=4)
    again = pickle.loads(pickle.dumps(spec))
    assert again.texts == job.texts and torch.equal(again.anchor.vector, spec.anchor.vector)


def test_ray_workers_get_the_device_map_and_max_memory(llama_pair_dirs, job, monkeypatch):
    """`--device-map` / `--max-memory` reach each Ray worker's pair, as `--device` does: the screen
    stage puts them in the JobSpec it hands the Ray backend, and a worker (the actor class, run here
    without Ray) opens its pair with them. Before issue 30's fix the job had no such fields."""
    import pickle

    from weightpatch.backends.ray_backend import ShardWorker
    from weightpatch.config import ScreenConfig
    from weightpatch.pipeline import screen as stage

    captured = {}

    def fake_backend(name, job, **options):
        captured.update(name=name, job=job)
        return None

    monkeypatch.setattr("weightpatch.backends.make_backend", fake_backend)
    base, sft = map(str, llama_pair_dirs)
    cfg = ScreenConfig(
        base=base, specialized=sft, prompts="p.txt", backend="ray", device_map="auto", max_memory="cpu=2GiB"
    )
    scorer = LocalBackend(job).state.scorer
    stage.exact_backend(cfg, scorer)
    sent = pickle.loads(pickle.dumps(captured["job"]))  # what an actor receives
    assert captured["name"] == "ray"
    assert (sent.device_map, sent.max_memory, sent.device) == ("auto", {"cpu": "2GiB"}, "cpu")
    worker = ShardWorker(sent)
    options = worker.state.scorer.pair.options
    assert (options["device_map"], options["max_memory"]) == ("auto", {"cpu": "2GiB"})
    assert worker.score(Shard(0, 0, ("L0.mlp",)))[1][0]["component"] == "L0.mlp"
