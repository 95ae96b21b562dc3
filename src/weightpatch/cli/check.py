"""``wpatch check BASE SPECIALIZED``: the pair check, component counts and weight change per layer."""

from __future__ import annotations

import typer
from rich.table import Table

from weightpatch.cli import common
from weightpatch.cli.options import add_command
from weightpatch.config import CheckConfig

GROUPS = ("attn", "mlp", "norm", "other")


def show(cfg: CheckConfig) -> None:
    import pandas as pd

    from weightpatch.pipeline import run_check

    cfg = cfg.model_copy(update={"progress": common.progress_wanted(cfg.progress)})
    result = run_check(cfg)
    common.out.print(
        f"[bold green]patchable pair[/]: {result.family}, {result.num_layers} layers, {result.num_heads} heads, "
        f"{result.neurons_per_layer} MLP neurons per layer",
        soft_wrap=True,
    )
    counts = ", ".join(f"{n} {k}s" for k, n in result.component_counts.items())
    common.out.print(f"components: {counts}", soft_wrap=True)
    table = result.weight_delta
    layered = table[table["layer"].notna()]
    wide = layered.pivot_table(index="layer", columns="group", values="relative_change")
    per_layer = layered.groupby("layer")[["delta_norm", "base_norm"]].agg(lambda x: (x**2).sum())
    wide["whole"] = (per_layer["delta_norm"] / per_layer["base_norm"]) ** 0.5
    t = Table(title="relative weight change ||sft - base|| / ||base||")
    t.add_column("layer / module", justify="right")
    cols = [g for g in (*GROUPS, "whole") if g in wide.columns]
    for g in cols:
        t.add_column(g, justify="right")
    for layer, row in wide.iterrows():
        t.add_row(str(layer), *(f"{row[g]:.2e}" if pd.notna(row[g]) else "" for g in cols))
    for _, row in table[table["layer"].isna()].iterrows():  # model-level modules: one number each
        t.add_row(row["group"], *([""] * (len(cols) - 1)), f"{row['relative_change']:.2e}")
    common.out.print(t)
    if result.adapter is not None:
        a = result.adapter
        common.out.print(
            f"LoRA adapter: rank {a.rank}, alpha {a.lora_alpha:g}{' (rsLoRA)' if a.use_rslora else ''}, "
            f"targets {', '.join(a.target_modules)}; ||delta W|| per layer: "
            + ", ".join(f"{layer}: {norm:.3g}" for layer, norm in sorted(a.layer_delta_norms.items()))
        )
    for role, found in (result.nonfinite or {}).items():
        listed = ", ".join(f"{name} ({nan} NaN, {inf} inf)" for name, nan, inf in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        typer.echo(f"warning: the {role} model has non-finite weights: {listed}{more}", err=True)
    if result.run_dir is not None:
        common.echo_path("weight delta table", result.run_dir / "weight_delta.parquet")


def register(app: typer.Typer) -> None:
    add_command(
        app,
        "check",
        CheckConfig,
        show,
        arguments=("base", "specialized"),
        skip=("seed",),
        help="Check that two models form a patchable pair; list component counts and the weight change per layer.",
    )
