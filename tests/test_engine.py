"""The sweep engine's own rules on a strategy that records what it is asked (no model)."""

from weightpatch.engine import sweep


class Recorder:
    """Items are (name, first layer); a group's rows say which group and position scored them."""

    method = "toy"
    variants_per_batch = 2
    stop = 2

    def __init__(self) -> None:
        self.groups: list[tuple[int, list[str]]] = []

    def key(self, item):
        return item[0]

    def first_layer(self, item):
        return item[1]

    def rows(self, group, layer):
        self.groups.append((layer, [name for name, _ in group]))
        return [[{"name": name, "group": len(self.groups), "zero": False}] for name, _ in group]

    def zero_rows(self, group):
        return [[{"name": name, "group": 0, "zero": True}] for name, _ in group]


def test_groups_by_first_layer_in_given_order_skips_dedupes_and_zeroes_above_the_stop():
    items = [("a", 1), ("b", 0), ("c", 1), ("d", 3), ("e", 1), ("b", 0), ("f", 0), ("g", 2)]
    strategy, streamed = Recorder(), []
    rows = sweep(strategy, items, skip={"f"}, on_result=streamed.append, progress=False)
    # one group per (layer, chunk of 2), layers ascending, the given order inside a layer
    assert strategy.groups == [(0, ["b"]), (1, ["a", "c"]), (1, ["e"]), (2, ["g"])]
    assert [r["name"] for r in rows] == ["a", "b", "c", "d", "e", "g"]  # given order, "b" once, "f" skipped
    assert [r["name"] for r in rows if r["zero"]] == ["d"]  # above the stop: nothing run
    assert sorted(r["name"] for batch in streamed for r in batch) == sorted(r["name"] for r in rows)
    assert len(streamed) == 5  # each group's rows as it finishes, the zero group included
