"""Sources vs routers (docs/method.md, "Activation patching and roles"): a role per component from its two effects.

Each component has an activation-space effect ``E_act`` (:mod:`weightpatch.activation`: its
*output* swapped in from the specialized run) and a weight-space effect ``E_w`` (exact Weight
Patching: its *weights* swapped in), both fractions of the same anchor gap. The roles:

=========  =============================  ===================================================
role       rule                           reading
=========  =============================  ===================================================
source     weight high, activation low    the change lives in the component's own weights
router     activation high, weight low    its output changes because of what it reads
           (aggregator)                   (upstream changes), not because of its weights
both       both high                      new weights and a changed output that matters
neither    both low
=========  =============================  ===================================================

"High" for a method means ``|score| >= max(absolute, relative * max|score|)``, where the maximum is
over the components **of the same kind** for that method (heads are compared with heads, neurons
with neurons): a head is not "low" merely because a whole layer scores higher. Defaults:
``relative = 0.25`` and ``absolute = 0.02`` (2% of the gap; the absolute floor keeps a kind whose
components all score ~0 from having "high" members by noise). Both are parameters.
"""

from __future__ import annotations

import logging

import pandas as pd

from weightpatch.results import ScoreTable

ROLES = ("source", "router", "both", "neither")
logger = logging.getLogger("weightpatch")


def _high(scores: pd.Series, kinds: pd.Series, relative: float, absolute: float) -> pd.Series:
    scale = scores.abs().groupby(kinds).transform("max").fillna(0.0)
    return (scores.abs() >= (relative * scale).clip(lower=absolute)) & scores.notna()


def assign_roles(
    activation: ScoreTable | pd.DataFrame,
    weight: ScoreTable | pd.DataFrame,
    activation_method: str = "activation",
    weight_method: str = "exact",
    relative: float = 0.25,
    absolute: float = 0.02,
) -> pd.DataFrame:
    """One row per component present in both tables: ``component, kind, layer, index, activation,
    weight, activation_high, weight_high, role, weight_method`` (the method of the weight column).
    The inputs are score tables (or their frames); rows of other methods are ignored, so one
    combined table can be passed twice. Components scored by only one of the two methods get no
    role; a warning says how many of each side were left out."""
    frames = []
    for table, method, column in ((activation, activation_method, "activation"), (weight, weight_method, "weight")):
        f = table.frame if isinstance(table, ScoreTable) else table
        f = f[f["method"] == method][["component", "kind", "layer", "index", "score"]]
        frames.append(f.drop_duplicates("component").rename(columns={"score": column}))
    merged = frames[0].merge(frames[1], on=["component", "kind", "layer", "index"], how="inner")
    for frame, method in zip(frames, (activation_method, weight_method), strict=True):
        if len(frame) > len(merged):
            logger.warning(
                "roles: %d of %d components with %s scores have no %s score and get no role",
                len(frame) - len(merged),
                len(frame),
                method,
                weight_method if method == activation_method else activation_method,
            )
    merged["activation_high"] = _high(merged["activation"], merged["kind"], relative, absolute)
    merged["weight_high"] = _high(merged["weight"], merged["kind"], relative, absolute)
    a, w = merged["activation_high"], merged["weight_high"]
    merged["role"] = "neither"
    merged.loc[w & ~a, "role"] = "source"
    merged.loc[a & ~w, "role"] = "router"
    merged.loc[a & w, "role"] = "both"
    merged["role"] = pd.Categorical(merged["role"], categories=list(ROLES))
    merged["weight_method"] = pd.Series(weight_method, index=merged.index, dtype="string")
    return merged.reset_index(drop=True)


def role_summary(roles: pd.DataFrame) -> pd.DataFrame:
    """Counts of each role per (layer, kind): columns ``layer, kind, source, router, both,
    neither`` (long enough for a stacked bar chart per layer)."""
    counts = roles.groupby(["layer", "kind", "role"], observed=False).size().unstack("role", fill_value=0)
    counts = counts.reindex(columns=list(ROLES), fill_value=0)
    counts = counts[counts.sum(axis=1) > 0]
    return counts.reset_index().rename_axis(columns=None)


def role_of(roles: pd.DataFrame, component: str) -> str:
    """The role of one component by name."""
    row = roles[roles["component"] == component]
    if row.empty:
        raise KeyError(f"{component} is not in the roles table")
    return str(row["role"].iloc[0])
