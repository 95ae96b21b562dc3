"""The numbers do not move (issue 29): every scoring engine reproduces the tables recorded in
``tests/data/golden/`` by ``tests/golden_tables.py`` on the demo pair, bit for bit (every float
column compared with ``==``; the recorded commit is in ``tests/data/golden/meta.json``). Row order
is not part of the numbers: both sides are sorted by their key columns (the sweep engine returns
rows in the order asked, the old exact screen in layer order)."""

import json

import pandas as pd
import pytest
import torch

from golden_tables import GOLDEN, TABLES, read, setup
from weightpatch.backends import LocalBackend


@pytest.fixture(scope="module")
def scorer():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recorded tables were made single-threaded
    try:
        yield setup()[1]
    finally:
        torch.set_num_threads(threads)


def test_every_table_is_recorded():
    assert json.loads((GOLDEN / "meta.json").read_text())["tables"] == list(TABLES)


@pytest.mark.parametrize("name", list(TABLES))
def test_table_reproduces_the_recorded_numbers_bit_for_bit(scorer, name):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = TABLES[name](scorer)
    finally:
        torch.set_num_threads(threads)
    want = read(name)
    key = [c for c in ("component", "target", "supplier", "k") if c in want.columns]
    want = want.sort_values(key).reset_index(drop=True)
    got = got.astype(want.dtypes.to_dict()).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_exact=True)


@pytest.mark.parametrize(
    ("method", "options", "recorded"),
    [("activation", {"positions": "last"}, "activation_last"), ("local_exact", {}, "local_exact_2")],
)
def test_the_local_backend_shards_any_sweep_method_to_the_recorded_numbers(scorer, method, options, recorded):
    """Sharded by the backend (one layer per shard, 8 per shard, neurons 256 per shard; the
    duration estimate calibrated first), a sweep method gives its recorded table to float32
    round-off (the shards group the variants differently, and the stacked products then have
    other shapes)."""
    want = read(recorded).set_index("component")
    backend = LocalBackend.from_scorer(scorer, 8, method=method, method_options=options)
    got = backend.run(list(want.index), progress=False).frame.set_index("component").loc[want.index]
    assert (got["method"] == method).all()
    assert [e.subject().split()[0] for e in backend.estimates] == [method] * len(backend.estimates) != []
    pd.testing.assert_series_equal(got["score"], want["score"], check_exact=False, rtol=1e-6, atol=1e-9)
