"""``wpatch anchor``: flags -> :class:`~weightpatch.config.AnchorConfig` -> :func:`~weightpatch.pipeline.run_anchor`."""

from __future__ import annotations

import typer

from weightpatch.cli import common
from weightpatch.cli.options import add_command
from weightpatch.config import AnchorConfig


def show(cfg: AnchorConfig) -> None:
    from weightpatch.pipeline import run_anchor

    result = run_anchor(cfg.model_copy(update={"progress": common.progress_wanted(cfg.progress)}))
    m = result.anchor.metrics
    common.out.print(
        f"anchor: layer {result.anchor.layer} ({result.anchor.method}); held-out Cohen's d "
        f"{m.get('cohen_d', float('nan')):.2f}, AUC {m.get('auc', float('nan')):.3f}",
        soft_wrap=True,  # a narrow terminal wraps the line itself: no break inserted between a name and its value
    )
    if result.steering is not None:
        curve = result.steering
        if "direction" in curve.columns:  # the anchor's own rows (random directions and references aside)
            curve = curve[curve["direction"] == "anchor"]
        pairs = zip(curve["alpha"], curve["metric"], strict=True)
        common.out.print("steering: " + ", ".join(f"alpha {a:g}: {v:.2f}" for a, v in pairs), soft_wrap=True)
    common.echo_path("run directory", result.run_dir)


def register(app: typer.Typer) -> None:
    add_command(
        app,
        "anchor",
        AnchorConfig,
        show,
        arguments=("base", "specialized"),
        help="Build and validate the vector anchor; save it (with the layer search and steering curve) in the run "
        "directory.",
    )
