"""Paired bootstrap intervals for differences between two models scored on the same test items.

A group is one skill's test split: per-item scores of model A and model B on the same items and a
``scale`` (the skill's ``expert - base`` accuracy, so that a difference of accuracies becomes a
difference of normalized scores). The statistic is the mean over groups of
``mean_i (a_i - b_i) / scale``; each bootstrap replicate resamples every group's items with
replacement (independently per group, the same indices for A and B: paired), and the interval is the
``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (numpy's linear interpolation) of the replicates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """The observed difference and its bootstrap interval."""

    diff: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    groups: Sequence[tuple[Sequence[float], Sequence[float], float]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    resamples: Sequence[np.ndarray] | None = None,
) -> Interval:
    """Interval of the mean over ``groups`` of ``mean(a - b) / scale`` (module docstring).
    ``resamples``: one ``(n_boot, n_items)`` index matrix per group instead of drawing them from
    ``numpy.random.default_rng(seed)`` (for a hand check)."""
    rng = np.random.default_rng(seed)
    diffs = []
    replicates = []
    for g, (a, b, scale) in enumerate(groups):
        d = (np.asarray(a, dtype=float) - np.asarray(b, dtype=float)) / scale
        if d.size == 0:
            raise ValueError("a bootstrap group needs at least one item")
        idx = resamples[g] if resamples is not None else rng.integers(0, d.size, size=(n_boot, d.size))
        diffs.append(d.mean())
        replicates.append(d[np.asarray(idx)].mean(axis=1))
    means = np.mean(replicates, axis=0)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(np.mean(diffs)), float(low), float(high))
