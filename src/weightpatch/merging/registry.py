"""The one list of what ``wpatch merge`` offers: standard merge methods, mechanism-aware rules and score
sources, each registered once with its formula, its defaults, its mergekit name (None when mergekit
has no equivalent) and the Python function that implements it.

The config (``weightpatch.config.MergeStageConfig``) takes its allowed values and help text from here,
:class:`~weightpatch.merging.methods.MergeConfig` its per-method defaults, and docs/method.md lists
the same formulas (a test keeps them equal). This module imports nothing heavy (no torch), so the
CLI can build its flags without loading the merging code; :meth:`Entry.load` imports the function.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered method, rule or score source.

    ``summary``: one line (CLI help). ``formula``: the formula in plain text, with ``delta_i =
    expert_i - base`` and ``w_i`` the per-expert weights. ``defaults``: the values of its parameters
    when the user gives none. ``mergekit``: mergekit's ``merge_method`` with the same formula.
    ``function``: ``"module:attribute"`` of the Python function."""

    name: str
    summary: str
    formula: str
    function: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    mergekit: str | None = None

    def load(self) -> Callable[..., Any]:
        """The Python function (imported on first use)."""
        module, attribute = self.function.split(":")
        return getattr(importlib.import_module(module), attribute)


def _registry(*entries: Entry) -> dict[str, Entry]:
    return {e.name: e for e in entries}


_M = "weightpatch.merging.methods"
_R = "weightpatch.merging.mechanism"
_S = "weightpatch.merging.scores"

STANDARD = _registry(
    Entry(
        "task_arithmetic",
        "base + lam * sum_i w_i delta_i.",
        "merged = base + lam * sum_i w_i * delta_i   (normalize: divided by sum_i w_i)",
        f"{_M}:task_arithmetic",
        {"normalize": False},
        "task_arithmetic",
    ),
    Entry(
        "ties",
        "trim each delta to its top --density by magnitude, elect signs, average the agreeing ones.",
        "t_i = top_density(delta_i); s = sign(sum_i w_i t_i); "
        "merged = base + lam * sum_i w_i t_i [sign t_i = s] / sum_i w_i [sign t_i = s]",
        f"{_M}:ties",
        {"normalize": True, "density": 1.0},
        "ties",
    ),
    Entry(
        "dare_linear",
        "drop delta entries with probability --drop-rate, rescale by 1/(1-p), task arithmetic.",
        "d_i = delta_i * bernoulli(1 - p) / (1 - p); merged = base + lam * sum_i w_i d_i",
        f"{_M}:dare_linear",
        {"normalize": False},
        "dare_linear",
    ),
    Entry(
        "dare_ties",
        "DARE drop and rescale, then TIES sign election (agreeing deltas summed).",
        "d_i = delta_i * bernoulli(1 - p) / (1 - p); s = sign(sum_i w_i d_i); "
        "merged = base + lam * sum_i w_i d_i [sign d_i = s]",
        f"{_M}:dare_ties",
        {"normalize": False},
        "dare_ties",
    ),
    Entry(
        "localize_stitch",
        "dataless Localize-and-Stitch: each delta's top --density entries, averaged where they overlap.",
        "m_i = [entry in top_density |delta_i|]; merged = base + lam * sum_i w_i m_i delta_i / max(1, sum_i m_i)",
        f"{_M}:localize_stitch",
        {"density": 0.1},
    ),
    Entry(
        "consensus",
        "TALL-mask consensus: task arithmetic kept only where >= --min-agree experts' TALL masks agree.",
        "tau = sum_i w_i delta_i; m_i = [|delta_i| >= tall_lambda * |tau - delta_i|]; "
        "merged = base + lam * tau * [sum_i m_i >= min_agree]",
        f"{_M}:consensus",
        {"tall_lambda": 0.6, "min_agree": 2},
    ),
    Entry(
        "layer_swap",
        "layer swapping: decoder layer l is copied from expert --layer-owners[l] (-1: the base).",
        "layer l: merged = expert_{o(l)} (o(l) = -1: base); other tensors: task arithmetic",
        f"{_M}:layer_swap",
        {"layer_owners": None},
    ),
)

RULES = _registry(
    Entry(
        "owner_takes_top",
        "each expert owns its top components: its delta there, the standard merge elsewhere.",
        "owned x: merged = base + strength * sum_{i in W(x)} a_i delta_i + others * lam * sum_{j not in W(x)} w_j "
        "delta_j; elsewhere: base + rest * (standard - base)",
        f"{_R}:owner_takes_top",
        {"top_k": 10, "strength": 1.0, "conflict": "max", "others": 0.0, "rest": 1.0},
    ),
    Entry(
        "score_weighted",
        "per-entry weights max(floor, scale * normalized score) inside the standard merge.",
        "W_i(x) = max(floor, scale * s_i(x)); merged = standard merge with weights w_i * W_i(x)",
        f"{_R}:score_weighted",
        {"floor": 0.3, "scale": 1.0},
    ),
    Entry(
        "protect_then_add",
        "the protected expert's top components at full strength, the standard merge elsewhere.",
        "P = entries of the protected expert p's top components; x in P: merged = base + strength * delta_p "
        "+ others * lam * sum_{j != p} w_j delta_j; elsewhere: the standard merge",
        f"{_R}:protect_then_add",
        {"protect": 0, "fraction": 0.1, "strength": 1.0, "others": 0.0},
    ),
    Entry(
        "stitch",
        "Localize-and-Stitch with any scores: each expert's top --fraction components, averaged on overlaps.",
        "m_i = [x in expert i's top-fraction components]; merged = base + strength * sum_i m_i delta_i / "
        "max(1, sum_i m_i)   (conflict=drop: entries with sum_i m_i > 1 stay base)",
        f"{_R}:stitch",
        {"fraction": 0.1, "strength": 1.0, "conflict": "mean"},
    ),
)

SCORE_SOURCES = _registry(
    Entry(
        "weight_patching",
        "Weight Patching scores from --scores (a score table or a run directory per expert).",
        "s_i(c) = the score of component c in expert i's table",
        "weightpatch.pipeline.merge:read_scores",
    ),
    Entry(
        "magnitude",
        "the norm of each component's delta (no data).",
        "s_i(c) = ||delta_i restricted to c's entries||_2",
        f"{_S}:magnitude_scores",
    ),
    Entry(
        "snip",
        "SNIP saliency on the expert's own texts (--snip-data), as in LED-Merging.",
        "s_i(c) = sum_{x in c} |theta_i(x) * dL_i/dtheta_i(x)|, L_i = LM loss of expert i on its texts",
        f"{_S}:snip_scores",
    ),
    Entry(
        "random",
        "uniform random scores, seeded by --seed (the control).",
        "s_i(c) ~ U[0, 1), drawn in the component order from random.Random(f'{seed}:{i}') for expert i",
        f"{_S}:random_scores",
    ),
)

METHODS: tuple[str, ...] = tuple(STANDARD)
MECHANISMS: tuple[str, ...] = ("none", *RULES)
SOURCES: tuple[str, ...] = tuple(SCORE_SOURCES)


def choices_help(registry: Mapping[str, Entry], lead: str = "") -> str:
    """``lead`` then ``name: summary`` of every entry: the help text of a choice flag."""
    return lead + "; ".join(f"{name}: {entry.summary.rstrip('.')}" for name, entry in registry.items()) + "."


def default(method: str, parameter: str, fallback: Any = None) -> Any:
    """The registered default of ``parameter`` for ``method`` (standard or rule), else ``fallback``."""
    entry = STANDARD.get(method) or RULES.get(method)
    return entry.defaults.get(parameter, fallback) if entry else fallback
