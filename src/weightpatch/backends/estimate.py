"""How long an exact sweep will take, measured on its own first shards before the rest runs.

A component first affecting block ``l`` re-runs blocks ``l..anchor`` (fewer for neurons whose block
adds its MLP output to the residual, see :mod:`weightpatch.screening.neurons`), so a shard's time is
close to linear in its number of components and in the blocks they re-run::

    seconds(shard) ~ per_component * n + per_block * blocks

with ``n`` the shard's components at or below the anchor and ``blocks`` the sum over them of
``anchor - l + 1`` (components above the anchor cost nothing). The two coefficients are fitted per
engine (MLP neurons through the batched neuron path, every other component through the exact
screen) on calibration units: the first ``unit`` components of one shard at the deepest, middle and
shallowest depth of the sweep. Calibration is real work (its scores are kept), so the estimate
adds the calibration's measured time to the prediction for everything else.

Both backends use it: the local one runs the calibration units first, then the rest; the Ray
backend submits the calibration units first, logs the estimate (worker time, and wall time on its
pool) once they are back, while the other shards already run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from weightpatch.backends.shards import Shard

if TYPE_CHECKING:
    from weightpatch.components import ComponentSpace

ENGINES = ("neuron", "component")  # the batched neuron path, the exact screen


@dataclass(frozen=True)
class Work:
    """What one shard costs: ``n`` components that run, re-running ``blocks`` blocks in all."""

    n: int
    blocks: int

    @property
    def depth(self) -> float:
        """Mean blocks re-run per component (0 when nothing runs)."""
        return self.blocks / self.n if self.n else 0.0


def engine(shard: Shard) -> str:
    """The engine that scores ``shard``: ``neuron`` or ``component``."""
    return "neuron" if shard.neurons else "component"


def shard_work(space: ComponentSpace, anchor_layer: int, shard: Shard) -> Work:
    """The components of ``shard`` that reach the anchor and the blocks they re-run."""
    depths = [anchor_layer - space.first_affected_layer(name) + 1 for name in shard.names]
    reach = [d for d in depths if d > 0]
    return Work(len(reach), sum(reach))


@dataclass(frozen=True)
class CostModel:
    """Seconds of one engine: ``per_component`` per component plus ``per_block`` per block it re-runs."""

    per_component: float
    per_block: float

    @classmethod
    def fit(cls, samples: Sequence[tuple[Work, float]]) -> CostModel:
        """Least squares through the origin on (work, seconds) samples, both coefficients >= 0 (one
        of them is dropped when the fit would make it negative, or when every sample has the same
        depth: then the time is taken as proportional to the blocks)."""
        samples = [(w, t) for w, t in samples if w.n]
        if not samples:
            return cls(0.0, 0.0)
        snn = sum(w.n * w.n for w, _ in samples)
        snb = sum(w.n * w.blocks for w, _ in samples)
        sbb = sum(w.blocks * w.blocks for w, _ in samples)
        snt = sum(w.n * t for w, t in samples)
        sbt = sum(w.blocks * t for w, t in samples)
        det = snn * sbb - snb * snb
        if det > 1e-9 * snn * sbb:
            a, b = (snt * sbb - sbt * snb) / det, (sbt * snn - snt * snb) / det
            if a >= 0 and b >= 0:
                return cls(a, b)
            if b < 0:
                return cls(max(snt / snn, 0.0), 0.0)
        return cls(0.0, max(sbt / sbb, 0.0))

    def seconds(self, work: Work) -> float:
        return self.per_component * work.n + self.per_block * work.blocks


def calibration_picks(works: Sequence[Work], count: int = 3) -> list[int]:
    """Indices of up to ``count`` shards spread over the depths in ``works`` (deepest, shallowest,
    then evenly between), the first shard of each chosen depth; shards that run nothing are never
    picked."""
    first_at: dict[float, int] = {}
    for i, w in enumerate(works):
        if w.n:
            first_at.setdefault(w.depth, i)
    depths = sorted(first_at, reverse=True)
    if len(depths) <= count:
        return [first_at[d] for d in depths]
    chosen = sorted({round(i * (len(depths) - 1) / (count - 1)) for i in range(count)})
    return [first_at[depths[i]] for i in chosen]


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 20 s``, ``41 min``, ``2 h 05 min``."""
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@dataclass(frozen=True)
class SweepEstimate:
    """The duration estimate of one engine's part of a sweep: ``seconds`` in all, of which
    ``calibration_seconds`` already spent on ``calibration_n`` components at ``calibration_layers``."""

    engine: str
    n_components: int
    layers: tuple[int, ...]
    seconds: float
    calibration_seconds: float
    calibration_n: int
    calibration_layers: tuple[int, ...]
    model: CostModel
    method: str = "exact"  # the scoring method swept (weightpatch.methods)

    @property
    def unit(self) -> str:
        return "neurons" if self.engine == "neuron" else "components"

    def subject(self) -> str:
        """``exact neuron sweep: 30,720 neurons in 20 layers``."""
        what = "neuron sweep" if self.engine == "neuron" else "sweep"
        layers = f"{len(self.layers)} layer{'s' if len(self.layers) != 1 else ''}"
        return f"{self.method} {what}: {self.n_components:,} {self.unit} in {layers}"

    def message(self) -> str:
        """One line, e.g. ``exact neuron sweep: 30,720 neurons in 20 layers, estimated 41 min
        (calibrated on 192 neurons at layers 0, 10, 19 in 1 min 05 s)``."""
        layers = ", ".join(map(str, self.calibration_layers))
        return (
            f"{self.subject()}, estimated {format_duration(self.seconds)} (calibrated on {self.calibration_n} "
            f"{self.unit} at layer{'s' if len(self.calibration_layers) != 1 else ''} {layers} in "
            f"{format_duration(self.calibration_seconds)})"
        )


def split_for_calibration(
    shards: Sequence[Shard], works: Sequence[Work], units: dict[str, int], count: int = 3
) -> tuple[list[Shard], list[Shard]]:
    """(calibration units, everything else in plan order): per engine, the first ``units[engine]``
    components of the shards :func:`calibration_picks` chooses, the rest of those shards staying
    in place."""
    calibration: list[Shard] = []
    rest = list(shards)
    for name in ENGINES:
        positions = [i for i, s in enumerate(shards) if engine(s) == name]
        for pick in calibration_picks([works[i] for i in positions], count):
            i = positions[pick]
            unit = max(units[name], 1)
            calibration.append(replace(shards[i], names=shards[i].names[:unit]))
            rest[i] = replace(shards[i], names=shards[i].names[unit:])
    return calibration, [s for s in rest if len(s)]


def estimate_sweep(
    name: str,
    anchor_layer: int,
    calibration: Sequence[tuple[Shard, Work, float]],
    rest: Sequence[tuple[Shard, Work]],
    method: str = "exact",
) -> SweepEstimate | None:
    """The estimate of engine ``name``'s part of a sweep from its calibration units (shard, work,
    measured seconds) and its remaining shards; ``None`` when none of its components runs."""
    calibration = [c for c in calibration if engine(c[0]) == name]
    rest = [r for r in rest if engine(r[0]) == name]
    n = sum(w.n for _, w, _ in calibration) + sum(w.n for _, w in rest)
    if not n:
        return None
    model = CostModel.fit([(w, t) for _, w, t in calibration])
    spent = sum(t for _, _, t in calibration)

    def layers(works: Iterable[Work]) -> tuple[int, ...]:
        return tuple(sorted({anchor_layer + 1 - round(w.depth) for w in works if w.n}))

    return SweepEstimate(
        engine=name,
        n_components=n,
        layers=layers([w for _, w, _ in calibration] + [w for _, w in rest]),
        seconds=spent + sum(model.seconds(w) for _, w in rest),
        calibration_seconds=spent,
        calibration_n=sum(w.n for _, w, _ in calibration),
        calibration_layers=layers(w for _, w, _ in calibration),
        model=model,
        method=method,
    )


def calibration_units(variants_per_batch: int, neurons_per_forward: int | None) -> dict[str, int]:
    """Calibration unit per engine: one forward's worth of variants (``neurons_per_forward`` None:
    neurons go through the exact screen, ``variants_per_batch`` per forward like the rest)."""
    return {"neuron": neurons_per_forward or variants_per_batch, "component": variants_per_batch}


def fit_estimates(
    anchor_layer: int,
    calibration: Sequence[tuple[Shard, Work, float]],
    rest: Sequence[tuple[Shard, Work]],
    method: str = "exact",
) -> list[SweepEstimate]:
    """:func:`estimate_sweep` for each engine that has components to run (of a sweep by ``method``)."""
    return [e for name in ENGINES if (e := estimate_sweep(name, anchor_layer, calibration, rest, method)) is not None]


def outcome_message(estimate: SweepEstimate, timings: Iterable[tuple[Shard, Work, float]]) -> str:
    """``exact sweep: 120 components in 3 layers: took 41 s (estimated 38 s)``, the time summed over
    the engine's pieces in ``timings``."""
    spent = sum(t for s, _, t in timings if engine(s) == estimate.engine)
    return f"{estimate.subject()}: took {format_duration(spent)} (estimated {format_duration(estimate.seconds)})"
