"""The one variant sweep every exact-style method runs on (docs/development.md, "The sweep engine").

A method is a small :class:`Strategy`: what its items are (components, suppliers, subsets), the
first decoder block an item changes, how many items one forward pass carries, and the rows of a
group of items that start at the same block. :func:`sweep` owns everything else, once:

- items already done (``skip``, by :meth:`Strategy.key`) are not run, duplicates run once;
- items are grouped by their first affected block (stable: the given order within a block) and cut
  into groups of ``variants_per_batch`` (the stacked variants of one forward; the group's make-up
  is part of the numbers: the anchor block's last-position products have the group's shape);
- items first affecting a block above the strategy's ``stop`` cannot move what it reads and get
  :meth:`Strategy.zero_rows` without running anything;
- each finished group's rows go to ``on_result`` (callers persist them as they come), a progress
  bar counts items, and the rows come back in the given order.

:class:`EffectStrategy` is the base of every method whose rows are score-table rows: it reads the
variants' outputs with the :class:`~weightpatch.engine.objective.Objective` and normalizes them with
:meth:`Objective.effect`, so a method only says how to get its variants' objective values.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from itertools import groupby
from typing import Generic, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from weightpatch.components import Component
from weightpatch.engine.objective import Objective
from weightpatch.patch import patched
from weightpatch.results import ScoreTable, score_row

Item = TypeVar("Item", bound=Hashable)
Item_contra = TypeVar("Item_contra", bound=Hashable, contravariant=True)
Rows = list[dict]
OnRows = Callable[[Rows], None]


class Strategy(Protocol[Item_contra]):
    """One method's variants (see the module docstring)."""

    method: str
    variants_per_batch: int

    @property
    def stop(self) -> int:
        """The highest block an item may first affect and still be run."""
        ...

    def key(self, item: Item_contra) -> str:
        """The item's name (what ``skip`` holds)."""
        ...

    def first_layer(self, item: Item_contra) -> int:
        """The first decoder block the item's variant changes (0: the embedding or block 0)."""
        ...

    def rows(self, group: Sequence[Item_contra], layer: int) -> list[Rows]:
        """The rows of each item of ``group`` (all first affecting ``layer <= stop``), one list per item."""
        ...

    def zero_rows(self, group: Sequence[Item_contra]) -> list[Rows]:
        """The rows of items that first affect a block above ``stop`` (nothing is run)."""
        ...


def sweep(
    strategy: Strategy[Item],
    items: Iterable[Item],
    skip: Iterable[str] = (),
    on_result: OnRows | None = None,
    progress: bool = True,
) -> Rows:
    """Run ``strategy`` over ``items`` (see the module docstring); the rows of every item run, in
    the given order."""
    skipped = set(skip)
    todo = [i for i in dict.fromkeys(items) if strategy.key(i) not in skipped]
    layer_of = {i: strategy.first_layer(i) for i in todo}
    results: dict[Item, Rows] = {}
    bar = tqdm(total=len(todo), desc=strategy.method, unit="item", disable=not progress)
    with torch.no_grad():
        for layer, same in groupby(sorted(todo, key=layer_of.__getitem__), key=layer_of.__getitem__):
            same_layer = list(same)
            size = max(strategy.variants_per_batch, 1)
            for start in range(0, len(same_layer), size):
                group = same_layer[start : start + size]
                rows = strategy.zero_rows(group) if layer > strategy.stop else strategy.rows(group, layer)
                results.update(zip(group, rows, strict=True))
                if on_result:
                    on_result([r for item_rows in rows for r in item_rows])
                bar.update(len(group))
    bar.close()
    return [r for i in todo for r in results[i]]


class EffectStrategy(Generic[Item]):
    """A method whose rows are score rows (:func:`~weightpatch.results.score_row`): subclasses give
    ``method``, ``variants_per_batch``, :meth:`component` (items are components unless overridden)
    and :meth:`values`; the effect, the zero rows above the objective's stop and the rows are here."""

    method: str
    variants_per_batch: int

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.space = objective.pair.space
        self.model = objective.pair.model

    @property
    def stop(self) -> int:
        return self.objective.stop

    def component(self, item: Item) -> Component:
        return item  # type: ignore[return-value]

    def validate(self, item: Item | str) -> Item:
        """The item a caller names (components: by name or :class:`Component`, checked against the model)."""
        return self.space.validate(item)  # type: ignore[arg-type,return-value]

    def key(self, item: Item) -> str:
        return self.component(item).name

    def first_layer(self, item: Item) -> int:
        return self.space.first_affected_layer(self.component(item))

    def values(self, group: Sequence[Item], layer: int) -> torch.Tensor:
        """The objective's value (variant, prompt) of each item's variant (all first affecting ``layer``)."""
        raise NotImplementedError

    def rows(self, group: Sequence[Item], layer: int) -> list[Rows]:
        out = []
        for item, values in zip(group, self.values(group, layer), strict=True):
            e = self.objective.effect(values)
            out.append([score_row(self.component(item), self.method, e.mean, e.stderr, e.n_prompts)])
        return out

    def zero_rows(self, group: Sequence[Item]) -> list[Rows]:
        n = int(self.objective.valid.sum())
        return [[score_row(self.component(item), self.method, 0.0, 0.0, n)] for item in group]

    def parts(self, items: list[Item]) -> list[tuple[Strategy, list[Item]]]:
        """The sweeps that score ``items``: this strategy, and the plain way (:class:`WholeModel`)
        for the items whose weights the objective's readout itself uses (a method whose items need
        other strategies, e.g. local-exact's neurons, splits further)."""
        read = [i for i in items if self.objective.reads_weights(self.component(i))]
        if not read:
            return [(self, items)]
        rest = [i for i in items if i not in set(read)]  # items are hashable (sweep groups them)
        return [(self, rest), (WholeModel(self), read)]

    def score(
        self,
        items: Iterable[Item | str],
        skip: Iterable[str] | None = None,
        on_result: Callable[[ScoreTable], None] | None = None,
        progress: bool = True,
    ) -> ScoreTable:
        """:func:`sweep` of this strategy as a score table, one row per item in the given order
        (``items`` validated first, duplicates scored once); ``on_result`` gets each group's rows as a
        table."""
        todo = [self.validate(i) for i in items]
        streamed = (lambda rows: on_result(ScoreTable.from_rows(rows))) if on_result else None
        rows = [r for strategy, part in self.parts(todo) for r in sweep(strategy, part, skip or (), streamed, progress)]
        order = {self.key(item): n for n, item in reversed(list(enumerate(todo)))}
        return ScoreTable.from_rows(sorted(rows, key=lambda row: order[row["component"]]))


class WholeModel(EffectStrategy[Item]):
    """The plain way for the items of ``strategy`` that its objective's readout reads (the final
    norm and unembedding under the behaviour objective): the item patched in, one whole forward of
    the model (:meth:`Objective.values`), restored. Same method name and rows as ``strategy``; no
    item is above its stop."""

    def __init__(self, strategy: EffectStrategy[Item]) -> None:
        super().__init__(strategy.objective)
        self.base_strategy = strategy
        self.method, self.variants_per_batch = strategy.method, 1

    @property
    def stop(self) -> int:
        return self.space.num_layers

    def component(self, item: Item) -> Component:
        return self.base_strategy.component(item)

    def values(self, group: Sequence[Item], layer: int) -> torch.Tensor:
        out = []
        for item in group:
            with patched(self.model, self.objective.pair.donor, self.space, [self.component(item)]):
                out.append(self.objective.values(self.model))
        return torch.stack(out)
