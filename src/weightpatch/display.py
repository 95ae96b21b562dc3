"""Short notebook displays: the one HTML card every result object (:class:`~weightpatch.results.ScoreTable`,
:class:`~weightpatch.anchors.Anchor`, :class:`~weightpatch.scoring.AnchorScorer`,
:class:`~weightpatch.pair.ModelPair`) shows as its ``_repr_html_``: a title, a few facts and at most a
short table, never the model or the vector itself; and :func:`template`, the package's Jinja2
templates (the report page, a run's notebook display)."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

import jinja2
import pandas as pd

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("weightpatch", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)


def template(name: str) -> jinja2.Template:
    """One of the package's Jinja2 templates (``weightpatch/templates/<name>``), autoescaping."""
    return _ENV.get_template(name)


def number(value: Any) -> str:
    """A float with three significant decimals (``1.23e-05`` when tiny), anything else as ``str``."""
    if isinstance(value, float):
        return f"{value:.3g}" if value != 0 and abs(value) < 1e-3 else f"{value:.3f}"
    return str(value)


def facts_text(facts: Mapping[str, Any]) -> str:
    """``key value, key value`` (the one-line form of a card's facts)."""
    return ", ".join(f"{k} {number(v)}" for k, v in facts.items())


def html_card(title: str, facts: Mapping[str, Any], frame: pd.DataFrame | None = None) -> str:
    """A titled list of facts and an optional (already short) table, as notebook HTML."""
    items = "".join(f"<li>{escape(str(k))}: <code>{escape(number(v))}</code></li>" for k, v in facts.items())
    table = frame.to_html(index=False, float_format=lambda v: number(float(v)), na_rep="") if frame is not None else ""
    return f'<div class="weightpatch"><p><b>{escape(title)}</b></p><ul>{items}</ul>{table}</div>'
