"""``wpatch check BASE SPECIALIZED``: is the pair patchable, what components it has, and how much
each layer's weights changed (relative Frobenius norm ``||sft - base|| / ||base||``)."""

from __future__ import annotations

from collections import defaultdict

import pandas as pd
import torch
import typer
from rich.table import Table
from tqdm.auto import tqdm

from weightpatch.cli import common
from weightpatch.components import ParamSlice
from weightpatch.config import CheckConfig, build_config
from weightpatch.rundir import RunDir

GROUPS = ("attn", "mlp", "norm", "other")


def parameter_groups(space) -> dict[str, tuple[int, str]]:
    """Canonical parameter name -> (layer, group); layer -1 and the module name for model-level ones."""
    groups: dict[str, tuple[int, str]] = {}
    for layer in range(space.num_layers):
        for module in space.module_names(layer):
            top = module.split(".")[0]
            group = top if top in ("attn", "mlp", "norm") else "other"
            for s in space.resolve(f"L{layer}.{module}"):
                if s.is_full and (s.name not in groups or groups[s.name][1] == "other"):
                    groups[s.name] = (layer, group)
        for s in space.resolve(f"L{layer}"):
            groups.setdefault(s.name, (layer, "other"))
    for c in space.model_level_modules():
        for s in space.resolve(c):
            groups.setdefault(s.name, (-1, c.name))
    return groups


def weight_delta_table(pair, progress: bool = True) -> pd.DataFrame:
    """Relative Frobenius norm of the weight change per (layer, group), read one donor tensor at a time."""
    sq_delta: dict[tuple[int, str], float] = defaultdict(float)
    sq_base: dict[tuple[int, str], float] = defaultdict(float)
    numel: dict[tuple[int, str], int] = defaultdict(int)
    groups = parameter_groups(pair.space)
    for name, key in tqdm(groups.items(), desc="weight delta", unit="tensor", disable=not progress):
        base = pair.model.get_parameter(name).detach().double()
        donor = pair.donor.read(ParamSlice(name)).to(base.device, torch.float64)
        sq_delta[key] += float((donor - base).pow(2).sum())
        sq_base[key] += float(base.pow(2).sum())
        numel[key] += base.numel()
    rows = [
        {
            "layer": layer,
            "group": group,
            "relative_change": (sq_delta[(layer, group)] ** 0.5) / max(sq_base[(layer, group)] ** 0.5, 1e-30),
            "delta_norm": sq_delta[(layer, group)] ** 0.5,
            "base_norm": sq_base[(layer, group)] ** 0.5,
            "parameters": numel[(layer, group)],
        }
        for layer, group in sorted(sq_delta)
    ]
    return pd.DataFrame(rows)


def component_counts(space) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for c in space.components():
        counts[c.kind] += 1
    return dict(counts)


def check(
    base: common.BaseArg,
    specialized: common.SpecArg,
    config: common.ConfigOpt = None,
    device: common.DeviceOpt = None,
    dtype: common.DtypeOpt = None,
    batch_size: common.BatchOpt = None,
    seed: common.SeedOpt = None,
    run_dir: common.RunDirOpt = None,
    trust_remote_code: common.TrustOpt = None,
    progress: common.ProgressOpt = None,
    debug: common.DebugOpt = False,
) -> None:
    """Check that two models form a patchable pair; list component counts and the weight change per layer."""
    cfg = build_config(
        CheckConfig,
        config,
        base=base,
        specialized=specialized,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        seed=seed,
        run_dir=run_dir,
        trust_remote_code=trust_remote_code,
        progress=progress,
    )
    pair = common.open_pair(cfg)
    space = pair.space
    table = weight_delta_table(pair, cfg.progress)
    counts = component_counts(space)
    common.out.print(
        f"[bold green]patchable pair[/]: {space.spec.family}, {space.num_layers} layers, {space.num_heads} heads, "
        f"{space.num_neurons(0)} MLP neurons per layer"
    )
    common.out.print("components: " + ", ".join(f"{n} {k}s" for k, n in counts.items()))
    wide = table[table["layer"] >= 0].pivot_table(index="layer", columns="group", values="relative_change")
    per_layer = table[table["layer"] >= 0].groupby("layer")[["delta_norm", "base_norm"]].agg(lambda x: (x**2).sum())
    wide["whole"] = (per_layer["delta_norm"] / per_layer["base_norm"]) ** 0.5
    t = Table(title="relative weight change ||sft - base|| / ||base||")
    t.add_column("layer / module", justify="right")
    cols = [g for g in (*GROUPS, "whole") if g in wide.columns]
    for g in cols:
        t.add_column(g, justify="right")
    for layer, row in wide.iterrows():
        t.add_row(str(layer), *(f"{row[g]:.2e}" if pd.notna(row[g]) else "" for g in cols))
    for _, row in table[table["layer"] < 0].iterrows():  # model-level modules: one number each
        t.add_row(row["group"], *([""] * (len(cols) - 1)), f"{row['relative_change']:.2e}")
    common.out.print(t)
    if run_dir is not None or (config is not None and cfg.run_dir is not None):
        with RunDir.open(cfg.run_dir, "check", cfg.identity(), pair.identities(), inputs=[base, specialized]) as run:
            run.save_table("weight_delta", table)
            common.echo_path("weight delta table", run.table_path("weight_delta"))


def register(app: typer.Typer) -> None:
    app.command("check")(common.handle_errors(check))
