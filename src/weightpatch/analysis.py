"""Findings: pure, typed computations over a run's tables (no figures, no HTML).

What a run found, computed from what its stages wrote: the verified components side by side
(:func:`verified`), the one ranking of top components (:func:`top_components`, used by the report's
findings and the CLI summary alike), first-order vs exact agreement (:func:`agreement`), the
curves' top-k against random-k (:func:`curve_findings`), behaviour where measured and the summary
items (:func:`findings`: ``[{"topic", "text", "values"}]``, ``values`` unformatted). The report
(:mod:`weightpatch.report`), ``Run.findings()`` and ``wpatch``'s summary render these; none of them
computes a finding of its own.

A run is anything with ``record``, ``anchor_record`` and ``table(name)`` (:class:`RunView`): a
:class:`~weightpatch.runs.Run` (``load_run``), so this module needs no run reader.
"""

from __future__ import annotations

from typing import Any, Protocol, TypedDict

import numpy as np
import pandas as pd
from scipy import stats

from weightpatch.results import ScoreTable

TOP_OVERLAP_K = 5  # top-k overlap of first-order and exact rankings in the limits
#: The methods a top-component ranking may use, in order of preference after ``exact``.
RANKING_FALLBACKS = ("first_order", "integrated_gradients")


class RunView(Protocol):
    """What findings read of a run: ``run.json`` (``record``), ``anchor.json`` (``anchor_record``)
    and its tables (``table(name)``: None when the run has no rows of it)."""

    record: dict[str, Any]
    anchor_record: dict[str, Any] | None

    def table(self, name: str) -> pd.DataFrame | None: ...


class Finding(TypedDict):
    """One summary item: its ``topic``, one line of ``text`` and the unformatted ``values``."""

    topic: str
    text: str
    values: dict[str, Any]


# ---- numbers in prose ------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals (two significant digits below ``10**-digits``, three
    above 10^4; "" for null); lists comma-joined; other values as ``str``."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(str(v) for v in value)
    if value is None or pd.isna(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v != 0 and abs(v) < 10**-digits:
            return f"{v:.2g}"
        return f"{v:.3g}" if abs(v) >= 1e4 else f"{v:.{digits}f}"
    return str(value)


def with_error(score: Any, stderr: Any, digits: int = 3) -> str:
    """``score ± stderr`` (just the score when the standard error is null)."""
    text = fmt(score, digits)
    if not text or stderr is None or pd.isna(stderr):
        return text
    if "e" in text or "." not in text:
        return f"{text} ± {fmt(stderr, digits)}"
    # the error in the score's own format: "0.003 ± 0.001", not "0.003 ± 0.00058"
    decimals = len(text.split(".")[1])
    error = f"{float(stderr):.{decimals}f}"
    return f"{text} ± {error}" if float(error) or not stderr else f"{text} ± <{10**-decimals:.{decimals}f}"


# ---- components ------------------------------------------------------------------------------------
def verified(run: RunView) -> pd.DataFrame | None:
    """One row per verified component with ``exact``, ``first_order`` and their stderr, by |exact|."""
    scores = run.table("scores")
    if scores is None:
        return None
    wide = ScoreTable(scores).side_by_side()
    listed = run.table("verified")
    names = listed["component"] if listed is not None else None
    if names is not None:
        wide = wide[wide["component"].isin(set(names))]
    elif "exact" in wide.columns:
        wide = wide[wide["exact"].notna()]
    if not len(wide):
        return None
    key = "exact" if "exact" in wide.columns else "first_order"
    return wide.sort_values(key, ascending=False, key=abs, na_position="last").reset_index(drop=True)


def ranking_method(wide: pd.DataFrame) -> str | None:
    """The method top components are ranked by in a side-by-side table: ``exact`` where it scored
    anything, else the first of :data:`RANKING_FALLBACKS` present (None: none of them)."""
    if "exact" in wide.columns and wide["exact"].notna().any():
        return "exact"
    return next((m for m in RANKING_FALLBACKS if m in wide.columns), None)


def top_components(wide: pd.DataFrame, n: int | None = None) -> tuple[str, pd.DataFrame] | None:
    """The one ranking of top components: the rows of a side-by-side table (``ScoreTable.side_by_side``
    or :func:`verified`) scored by :func:`ranking_method`, by decreasing ``|score|`` (ties in the
    table's order), the first ``n``; with the method. None when no method applies."""
    key = ranking_method(wide)
    if key is None:
        return None
    ranked = wide[wide[key].notna()].sort_values(key, ascending=False, key=abs, kind="stable")
    return key, ranked if n is None else ranked.head(n)


def agreement(verified: pd.DataFrame | None, k: int = TOP_OVERLAP_K) -> dict[str, Any] | None:
    """First-order vs exact on the verified components: Spearman rank correlation (scipy) and the
    overlap of the two top-``k`` sets by absolute score."""
    if verified is None or not {"exact", "first_order"} <= set(verified.columns):
        return None
    both = verified.dropna(subset=["exact", "first_order"])
    if len(both) < 3:
        return None
    rho = float(stats.spearmanr(both["first_order"], both["exact"]).statistic)
    k = min(k, len(both))
    top_exact = set(both.loc[both["exact"].abs().nlargest(k).index, "component"])
    top_first = set(both.loc[both["first_order"].abs().nlargest(k).index, "component"])
    return {"spearman": rho, "n": len(both), "k": k, "overlap": len(top_exact & top_first)}


# ---- curves and behaviour --------------------------------------------------------------------------
def curve_findings(frame: pd.DataFrame | None, column: str) -> list[dict[str, Any]]:
    """Per ranking: the largest k that has random controls, the top-k value and the random mean ± std."""
    if frame is None or column not in frame.columns:
        return []
    out = []
    groups = frame.groupby("ranking", sort=False) if "ranking" in frame.columns else [("components", frame)]
    for ranking, sub in groups:
        controlled = sub[sub.get("n_controls", pd.Series(0, index=sub.index)) > 0]
        if not len(controlled):
            continue
        row = controlled.sort_values("k").iloc[-1]
        out.append(
            {
                "ranking": str(ranking),
                "k": int(row["k"]),
                "value": float(row[column]),
                "random_mean": float(row["random_mean"]),
                "random_std": float(row["random_std"]),
                "n_controls": int(row["n_controls"]),
            }
        )
    return out


def behaviour_values(run: RunView) -> dict[str, Any] | None:
    """Behaviour where the run measured it (curves' behaviour metric and KL at their largest k, the
    behaviour table): ``{"texts", "values"}``, or None."""
    texts: list[str] = []
    values: dict[str, Any] = {}
    for name in ("sufficiency", "necessity"):
        frame = run.table(name)
        if frame is None:
            continue
        for column, label in (("behavior", "behaviour metric"), ("kl", "KL to the specialized model (nats)")):
            if column in frame.columns and frame[column].notna().any():
                row = frame.dropna(subset=[column]).sort_values("k").iloc[-1]
                values[f"{name}_{column}"] = float(row[column])
                texts.append(f"{name}, top-{int(row['k'])}: {label} {fmt(row[column])}")
    behavior = run.table("behavior")
    if behavior is not None:
        numeric = behavior.select_dtypes("number")
        for column in numeric.columns[:3]:
            values[f"behavior_{column}"] = numeric[column].tolist()
        texts.append(f"behaviour table: {len(behavior)} rows ({', '.join(map(str, numeric.columns[:3]))})")
    return {"texts": texts, "values": values} if texts else None


# ---- the summary -----------------------------------------------------------------------------------
def anchor_finding(run: RunView) -> Finding | None:
    """The anchor's layer and held-out separation, and the steering check where recorded."""
    anchor = run.anchor_record
    if anchor is None:
        return None
    m = anchor.get("metrics") or {}
    values = {"layer": anchor["layer"], "cohen_d": m.get("cohen_d"), "auc": m.get("auc")}
    text = (
        f"anchor at layer {values['layer']} ({anchor.get('method')}): held-out Cohen's d "
        f"{fmt(values['cohen_d'], 2)}, AUC {fmt(values['auc'])}"
    )
    steering = run.table("steering")
    if steering is not None:
        curve = steering[steering["direction"] == "anchor"] if "direction" in steering else steering
        curve = curve.sort_values("alpha")
        lo, hi = curve.iloc[0], curve.iloc[-1]
        values.update(steer_alpha=float(hi["alpha"]), steer_from=float(lo["metric"]), steer_to=float(hi["metric"]))
        name = str(steering["metric_name"].dropna().iloc[0]) if "metric_name" in steering else "the metric"
        text += (
            f"; steering the base along it moves {name} from {fmt(lo['metric'], 2)} "
            f"(alpha {fmt(lo['alpha'], 2)}) to {fmt(hi['metric'], 2)} (alpha {fmt(hi['alpha'], 2)})"
        )
        if "direction" in steering:
            rand = steering[(steering["direction"] == "random") & (steering["alpha"] == hi["alpha"])]
            if len(rand):
                values.update(random_mean=float(rand["metric"].mean()), random_std=float(rand["metric"].std()))
                text += (
                    f", random directions {with_error(values['random_mean'], values['random_std'], 2)} "
                    f"(mean ± sd, {len(rand)} draws)"
                )
            ref = steering[steering["direction"] == "specialized"]
            if len(ref):
                values["specialized"] = float(ref["metric"].iloc[0])
                text += f"; the specialized model scores {fmt(values['specialized'], 2)}"
    return {"topic": "Anchor", "text": text, "values": values}


def top_components_finding(run: RunView, wide: pd.DataFrame | None, n: int = 3) -> Finding | None:
    """The ``n`` top verified components (:func:`top_components`) with their roles where known."""
    ranked = top_components(wide, n) if wide is not None else None
    if ranked is None:
        return None
    key, top = ranked
    roles = run.table("roles")
    role_of = dict(zip(roles["component"], roles["role"].astype(str), strict=True)) if roles is not None else {}
    parts = []
    for _, row in top.iterrows():
        role = f" ({role_of[row['component']]})" if row["component"] in role_of else ""
        parts.append(f"{row['component']} {with_error(row[key], row.get(f'{key}_stderr'))}{role}")
    return {
        "topic": "Top components",
        "text": f"largest {key.replace('_', '-')} scores at the source: " + "; ".join(parts),
        "values": {
            "method": key,
            "components": top["component"].tolist(),
            "scores": top[key].tolist(),
            "stderr": top.get(f"{key}_stderr", pd.Series(np.nan, index=top.index)).tolist(),
        },
    }


def roles_finding(run: RunView) -> Finding | None:
    """How many components are sources, routers, both or neither (the first few of each named)."""
    roles = run.table("roles")
    if roles is None:
        return None
    counts = roles["role"].astype(str).value_counts()
    named = {
        r: roles.loc[roles["role"].astype(str) == r, "component"].head(4).tolist() for r in ("source", "router", "both")
    }
    text = "; ".join(f"{int(counts.get(r, 0))} {r}" + (f" ({', '.join(named[r])})" if named[r] else "") for r in named)
    text += f"; {int(counts.get('neither', 0))} neither, of {len(roles)} components with both scores"
    return {"topic": "Roles", "text": text, "values": {r: int(counts.get(r, 0)) for r in counts.index}}


def limits_finding(run: RunView, wide: pd.DataFrame | None) -> Finding | None:
    """The run's limits: prompts excluded from screening, first-order vs exact agreement."""
    limits: list[str] = []
    values: dict[str, Any] = {}
    screening = run.record.get("screening") or {}
    if screening:
        values.update(n_prompts=screening.get("n_prompts"), n_excluded=screening.get("n_excluded"))
        limits.append(
            f"{screening.get('n_excluded', 0)} of {screening.get('n_prompts')} screening prompts excluded "
            f"(anchor gap too small)"
        )
    agree = agreement(wide)
    if agree:
        values.update(agree)
        limits.append(
            f"first order vs exact on {agree['n']} verified components: Spearman {fmt(agree['spearman'])}, "
            f"top-{agree['k']} overlap {agree['overlap']}/{agree['k']}"
        )
    return {"topic": "Limits", "text": "; ".join(limits), "values": values} if limits else None


def findings(run: RunView) -> list[Finding]:
    """The summary at the top of the report: ``[{"topic", "text", "values"}]``, every number
    computed from the run's tables (``values`` holds them unformatted, for tests and notebooks)."""
    wide = verified(run)
    items = [anchor_finding(run), top_components_finding(run, wide)]
    for name, column, verb in (("sufficiency", "recovery", "recovers"), ("necessity", "drop", "removes")):
        curves = curve_findings(run.table(name), column)
        if curves:
            text = "; ".join(
                f"{c['ranking']}: top-{c['k']} {verb} {fmt(c['value'])} vs random-{c['k']} "
                f"{with_error(c['random_mean'], c['random_std'])} (mean ± sd of {c['n_controls']})"
                for c in curves
            )
            topic = "Top-k patched into the base" if name == "sufficiency" else "Top-k knocked out"
            items.append({"topic": topic, "text": text, "values": {"curves": curves}})
    items.append(roles_finding(run))
    validity = run.record.get("anchor_validity")
    if validity:
        items.append({"topic": "Anchor validity", "text": validity["line"], "values": dict(validity)})
    behaviour = behaviour_values(run)
    if behaviour:
        items.append({"topic": "Behaviour", "text": "; ".join(behaviour["texts"]), "values": behaviour["values"]})
    items.append(limits_finding(run, wide))
    return [item for item in items if item is not None]


__all__ = [
    "Finding",
    "RunView",
    "agreement",
    "behaviour_values",
    "curve_findings",
    "findings",
    "fmt",
    "ranking_method",
    "top_components",
    "verified",
    "with_error",
]
