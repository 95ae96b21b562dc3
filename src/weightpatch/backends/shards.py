"""Shards: the unit of work every backend schedules, planned from component names alone (no model,
no torch). A neutral module: the local and Ray backends and the duration estimate all read it, and
it reads none of them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import groupby

from weightpatch.components import Component
from weightpatch.errors import WeightPatchError

DEFAULT_SHARD_SIZE = 8
DEFAULT_NEURON_SHARD_SIZE = 256


@dataclass(frozen=True)
class Shard:
    """A few components of one layer (``layer`` None: model-level modules), scored together.
    ``neurons``: every name is an MLP neuron of ``layer`` (scored by the neuron sweep)."""

    index: int
    layer: int | None
    names: tuple[str, ...]
    neurons: bool = False

    def __len__(self) -> int:
        return len(self.names)


def plan_shards(
    components: Iterable[Component | str],
    skip: Iterable[str] = (),
    shard_size: int = DEFAULT_SHARD_SIZE,
    neuron_shard_size: int = DEFAULT_NEURON_SHARD_SIZE,
) -> list[Shard]:
    """Split ``components`` (minus ``skip`` and duplicates) into shards of one layer each: up to
    ``shard_size`` layers/modules/heads, or up to ``neuron_shard_size`` neurons. Names are only
    parsed here (no model needed); the worker checks that they exist. Shards come in layer
    order, model-level modules first."""
    if shard_size < 1 or neuron_shard_size < 1:
        raise WeightPatchError("shard sizes must be at least 1")
    skip = set(skip)
    seen: set[str] = set()
    todo: list[Component] = []
    for c in components:
        c = Component.parse(c) if isinstance(c, str) else c
        if c.name in skip or c.name in seen:
            continue
        seen.add(c.name)
        todo.append(c)

    def key(c: Component) -> tuple[int, bool]:
        return (-1 if c.layer is None else c.layer, c.kind == "neuron")

    todo.sort(key=key)  # stable: the given order within a group
    shards: list[Shard] = []
    for (layer, is_neuron), group in groupby(todo, key=key):
        names = [c.name for c in group]
        size = neuron_shard_size if is_neuron else shard_size
        for i in range(0, len(names), size):
            shards.append(Shard(len(shards), None if layer < 0 else layer, tuple(names[i : i + size]), is_neuron))
    return shards
