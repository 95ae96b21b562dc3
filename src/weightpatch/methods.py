"""The scoring-method registry: every way of scoring components, with its label and its defaults.

One :class:`ScoringMethod` per method, registered here by name. The screen config's allowed
``method`` and ``screen`` values (and so the CLI's choices and help), the report's panel labels and
the CLI summary's column order come from :data:`SCORING_METHODS`; a sweep method names its
strategy class (a :class:`~weightpatch.engine.EffectStrategy` built as ``cls(scorer, **options)``),
which is what the backends shard. This module imports nothing heavy (the config and the CLI read
it); :meth:`ScoringMethod.strategy` imports the strategy's module when a sweep is built.

Adding a method: write its strategy (a small module over :mod:`weightpatch.engine`), then one
:func:`register` call below.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from weightpatch.errors import WeightPatchError

Space = Literal["weight", "activation"]
Stage = Literal["screen", "verify", "trace"]


@dataclass(frozen=True)
class ScoringMethod:
    """A scoring method: ``name`` (the ``method`` column of score tables), ``label`` (report
    panels), ``help`` (one line for the CLI), its ``space`` (weights or activations), the
    ``stages`` it may be chosen in (``screen``: ``wpatch screen --method``; ``verify``: a ranking
    screen of ``--method verify``; ``trace``: the trace stage), its ``defaults`` (keyword options of
    its function or strategy) and, for sweep methods, ``strategy`` (``module:Class``)."""

    name: str
    label: str
    help: str
    space: Space = "weight"
    stages: tuple[Stage, ...] = ("screen",)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    strategy: str | None = None

    def strategy_class(self) -> type:
        """The strategy class of a sweep method (imported now)."""
        if self.strategy is None:
            raise WeightPatchError(f"{self.name} is not a sweep method: it cannot be sharded over a backend")
        module, _, name = self.strategy.partition(":")
        return getattr(importlib.import_module(module), name)

    def build(self, scorer: Any, **options: Any) -> Any:
        """The method's strategy on ``scorer`` with its defaults, overridden by ``options``."""
        return self.strategy_class()(scorer, **{**self.defaults, **options})


SCORING_METHODS: dict[str, ScoringMethod] = {}


def register(method: ScoringMethod) -> ScoringMethod:
    if method.name in SCORING_METHODS:
        raise ValueError(f"scoring method {method.name!r} is registered twice")
    SCORING_METHODS[method.name] = method
    return method


def scoring_method(name: str) -> ScoringMethod:
    """The registered method ``name``; an unknown name is refused with the list of known ones."""
    if name not in SCORING_METHODS:
        raise WeightPatchError(f"unknown scoring method {name!r}; choose one of {', '.join(SCORING_METHODS)}")
    return SCORING_METHODS[name]


def method_names(stage: Stage | None = None) -> tuple[str, ...]:
    """Registered method names (in registration order), those usable in ``stage`` if given."""
    return tuple(m.name for m in SCORING_METHODS.values() if stage is None or stage in m.stages)


def label(name: str) -> str:
    """The report label of a method name (the name itself when it is not registered)."""
    return SCORING_METHODS[name].label if name in SCORING_METHODS else name


register(
    ScoringMethod(
        "first_order",
        "weight space, first order",
        "gradient at the receiver times the weight delta, every component in one backward pass per batch",
        stages=("screen", "verify"),
        defaults={"per_prompt": True},
    )
)
register(
    ScoringMethod(
        "local_exact",
        "weight space, local-exact",
        "each component's own block exact, the blocks above it linearized at the receiver",
        stages=("screen", "verify"),
        defaults={"exact_blocks": 2},
        strategy="weightpatch.screening.local_exact:LocalExactScreen",
    )
)
register(
    ScoringMethod(
        "integrated_gradients",
        "weight space, integrated gradients",
        "gradients averaged along the straight path to the donor (--steps points)",
        defaults={"steps": 8},
    )
)
register(
    ScoringMethod(
        "exact",
        "weight space, exact",
        "each component patched alone, one sweep over variants (slow, the reference)",
        defaults={"variants_per_batch": 8},
        strategy="weightpatch.screening.exact:ExactScreen",
    )
)
register(
    ScoringMethod(
        "verify",
        "weight space, screened then exact",
        "a screen (--screen) for everything, then exact scores for the top-k of each kind",
    )
)
register(
    ScoringMethod(
        "activation",
        "activation space",
        "each component's output overwritten with the specialized model's (activation patching)",
        space="activation",
        stages=("trace",),
        defaults={"variants_per_batch": 16, "positions": "all"},
        strategy="weightpatch.activation:ActivationScreen",
    )
)
