"""The check stage: is the pair patchable, what components it has, and how much each layer's weights
changed (relative Frobenius norm ``||sft - base|| / ||base||``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from weightpatch.components import ComponentSpace, ParamSlice
from weightpatch.config import CheckConfig
from weightpatch.lora import AdapterSummary, adapter_summary, is_adapter_dir
from weightpatch.pair import ModelPair, check_finite, nonfinite_parameters
from weightpatch.pipeline.forecast import forecast
from weightpatch.pipeline.inputs import open_run, pair_for

CHUNK_ELEMENTS = 2**22  # float64 working set of the weight-delta sums: 3 x 32 MiB at most


@dataclass
class CheckResult:
    """What ``wpatch check`` reports: the family and sizes, component counts per kind, and the
    weight change per (layer, group); ``layer`` is null for model-level modules (group = their name)."""

    family: str
    num_layers: int
    num_heads: int
    neurons_per_layer: int
    component_counts: dict[str, int]
    weight_delta: pd.DataFrame
    run_dir: Path | None
    adapter: AdapterSummary | None = None  # when the specialized model is a PEFT LoRA adapter
    nonfinite: dict[str, list[tuple[str, int, int]]] | None = None  # (name, n_nan, n_inf) per model, if allowed


def parameter_groups(space: ComponentSpace) -> dict[str, tuple[int, str]]:
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


def weight_delta_table(pair: ModelPair, progress: bool = True) -> pd.DataFrame:
    """Relative Frobenius norm of the weight change per (layer, group), read one donor tensor at a time
    and summed in float64 over chunks of ``CHUNK_ELEMENTS`` (whole, a 128k x 2048 embedding would need
    three float64 copies: 6 GB); ``layer`` is null for model-level modules (``group`` is then the module:
    ``embed``, ``unembed``, ...)."""
    sq_delta: dict[tuple[int, str], float] = defaultdict(float)
    sq_base: dict[tuple[int, str], float] = defaultdict(float)
    numel: dict[tuple[int, str], int] = defaultdict(int)
    groups = parameter_groups(pair.space)
    for name, key in tqdm(groups.items(), desc="weight delta", unit="tensor", disable=not progress):
        base = pair.model.get_parameter(name).detach().reshape(-1)
        donor = pair.donor.read(ParamSlice(name)).to(base.device).reshape(-1)
        for start in range(0, base.numel(), CHUNK_ELEMENTS):  # float64 one chunk at a time
            b = base[start : start + CHUNK_ELEMENTS].double()
            sq_delta[key] += float((donor[start : start + CHUNK_ELEMENTS].double() - b).pow(2).sum())
            sq_base[key] += float(b.pow(2).sum())
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
    table = pd.DataFrame(rows).astype({"layer": "Int64"})
    return table.assign(layer=table["layer"].mask(table["layer"] < 0))  # model-level modules: no layer


def component_counts(space: ComponentSpace) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for c in space.components():
        counts[c.kind] += 1
    return dict(counts)


def run_check(cfg: CheckConfig, pair: ModelPair | None = None) -> CheckResult:
    """Load (or take) the pair, which checks it; measure the weight change. With ``cfg.run_dir`` the
    table is saved there as ``weight_delta``."""
    forecast("check", cfg, pair)
    pair = pair_for(cfg, pair)
    space = pair.space
    nonfinite = None
    if cfg.allow_nonfinite:
        nonfinite = {role: found for role, found in nonfinite_parameters(pair).items() if found} or None
    else:
        check_finite(pair)
    table = weight_delta_table(pair, cfg.progress)
    adapter = None
    if is_adapter_dir(Path(pair.specialized.path)):
        layer_of = {name: layer for name, (layer, _) in parameter_groups(space).items()}
        adapter = adapter_summary(pair.specialized.path, layer_of)
    if cfg.run_dir is not None:
        with open_run(cfg, "check", pair, [cfg.base, cfg.specialized], check_weights=False) as run:
            run.save_table("weight_delta", table)
    return CheckResult(
        family=space.spec.family,
        num_layers=space.num_layers,
        num_heads=space.num_heads,
        neurons_per_layer=space.num_neurons(0),
        component_counts=component_counts(space),
        weight_delta=table,
        run_dir=cfg.run_dir,
        adapter=adapter,
        nonfinite=nonfinite,
    )
