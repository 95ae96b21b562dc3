"""Export a merge as a mergekit YAML config (mergekit >= 0.1, ``mergekit-yaml config.yml out/``).

Baselines map one to one: ``merge_method`` is ours (``task_arithmetic``, ``ties``, ``dare_ties``,
``dare_linear``), per-model ``weight`` / ``density`` (DARE: ``density = 1 - drop_rate``), and the
global ``normalize``. ``lam`` is folded into the weights when ``normalize`` is false (exact, and
valid for every mergekit version); with ``normalize: true`` it is written as mergekit's global
``lambda`` parameter (mergekit >= 0.1). The config sets ``dtype: float32`` (we merge in float32).

Per-tensor coefficients of the mechanism-aware merge use mergekit's conditional parameters: a list
of ``{filter: <substring of the tensor name>, value: v}`` entries, first match wins, closed by a
``{value: default}`` entry. Filters are full tensor names (``model.layers.1.mlp.up_proj.weight``),
checked to match exactly one tensor of the model.

An expert given several times (the same directory) is exported once with its weights summed
(mergekit refuses duplicate inputs; exact, see :func:`_combine_repeated`). When mergekit is
installed the config is loaded by its ``MergeConfiguration`` before it is returned.

What mergekit cannot express, and what the export approximates (each case is listed in
:attr:`ExportReport.approximations`):

* **slice-level coefficients**: heads and neurons own rows/columns of a tensor, but mergekit has
  one weight per model and tensor. The export writes the entry-mean of the per-entry
  coefficient over the tensor (exact when it is constant over the tensor).
* ``owner_takes_top`` replaces the standard merge on owned entries with the owner's *un-sparsified*
  delta. A wholly owned tensor is exported exactly as "owner weight, density 1, other experts
  weight 0" -- for ``normalize: true`` methods only when ``strength == lam`` (the weights cancel
  and mergekit applies ``lambda``). Partly owned tensors keep the standard density.
* DARE masks are random: mergekit draws them from torch's global RNG, we from a seeded per-tensor
  generator, so DARE merges agree in distribution only. Our default ``rescale="inverse"``
  (``1/(1-p)``) is exported as ``rescale: true``, which mergekit implements as L1-norm matching.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from weightpatch.errors import WeightPatchError
from weightpatch.merging.mechanism import MechanismMerge
from weightpatch.merging.methods import MergeConfig
from weightpatch.merging.registry import STANDARD

logger = logging.getLogger("weightpatch")


@dataclass
class ExportReport:
    """The config (a dict ready for ``yaml.safe_dump``) and the list of approximations."""

    config: dict[str, Any]
    approximations: list[str] = field(default_factory=list)
    validated: bool = False  # loaded by mergekit's MergeConfiguration (mergekit installed)

    @property
    def exact(self) -> bool:
        return not self.approximations


def _per_expert(value: float | Sequence[float], n: int) -> list[float]:
    return [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]


def _round(x: float) -> float:
    return float(f"{x:.8g}")


def _check_filters(names: Sequence[str], all_names: Sequence[str]) -> None:
    for n in names:
        hits = [m for m in all_names if n in m]
        if hits != [n]:
            raise WeightPatchError(f"mergekit filter {n!r} would match {hits}; cannot export unambiguously")


def mergekit_config(
    merge: MergeConfig | MechanismMerge,
    base_model: str | os.PathLike[str],
    experts: Sequence[str | os.PathLike[str]],
    *,
    dtype: str = "float32",
    out_dtype: str | None = None,
) -> ExportReport:
    """Build the mergekit config reproducing ``merge`` of ``experts`` onto ``base_model``."""
    mech = merge if isinstance(merge, MechanismMerge) else None
    cfg = mech.standard if mech is not None else merge
    assert isinstance(cfg, MergeConfig)
    n = len(experts)
    if STANDARD[cfg.method].mergekit is None:
        raise WeightPatchError(f"{cfg.method} has no mergekit equivalent; export a task_arithmetic or TIES merge")
    if mech is not None and mech.variant not in ("owner_takes_top", "score_weighted"):
        raise WeightPatchError(f"{mech.variant} has no mergekit equivalent; export owner_takes_top or score_weighted")
    if mech is not None and mech.num_experts != n:
        raise WeightPatchError(f"{n} expert paths for {mech.num_experts} score tables")
    notes: list[str] = []
    normalize = cfg.normalize_value
    fold = not normalize
    weights = list(cfg.weights) if cfg.weights is not None else [1.0] * n
    if len(weights) != n:
        raise WeightPatchError(f"{len(weights)} weights for {n} experts")
    sparse = cfg.method != "task_arithmetic"
    if cfg.method == "ties":
        density = _per_expert(cfg.density_value, n)
    elif cfg.method.startswith("dare"):
        density = [1 - p for p in _per_expert(cfg.drop_rate, n)]
        notes.append("DARE drop masks are random: mergekit's differ from ours (same distribution)")
        if cfg.rescale == "inverse":
            notes.append("DARE rescale: ours multiplies survivors by 1/(1-p); mergekit matches the L1 norm")
    else:
        density = [1.0] * n

    params: dict[str, Any] = {"normalize": normalize, "int8_mask": False}
    if cfg.method.startswith("dare"):
        params["rescale"] = cfg.rescale != "none"
    if not fold and cfg.lam != 1:
        params["lambda"] = cfg.lam
    lam_w = cfg.lam if fold else 1.0

    # per-expert default weight / density, and per-tensor overrides
    default_w = [lam_w * w for w in weights]
    if mech is not None and mech.variant == "score_weighted":
        default_w = [w * mech.floor for w in default_w]
    if mech is not None and mech.variant == "owner_takes_top" and mech.rest != 1:
        default_w = [w * mech.rest for w in default_w]
        if not fold:
            notes.append(f"owner_takes_top rest={mech.rest} with normalize=true: mergekit's normalization cancels it")
    w_over: list[dict[str, float]] = [{} for _ in range(n)]
    d_over: list[dict[str, float]] = [{} for _ in range(n)]
    if mech is not None:
        shapes = mech.space.shapes
        if mech.variant == "owner_takes_top" and normalize and mech.strength != cfg.lam:
            notes.append(
                f"owner_takes_top with normalize=true: owned tensors get lam={cfg.lam} * delta in mergekit, "
                f"strength={mech.strength} in ours"
            )
        if mech.variant == "owner_takes_top" and cfg.method != "task_arithmetic":
            notes.append(
                "owner_takes_top: owned entries use the owner's un-sparsified delta; mergekit still "
                "sparsifies partly owned tensors"
            )
        for name in mech.parameters_touched():
            shape = shapes[name]
            if mech.variant == "owner_takes_top":
                owned_coef = mech.owner_coefficients(name, shape)
                assert owned_coef is not None
                owned, coef = owned_coef
                coefs = [torch.where(owned, coef[i], torch.tensor(default_w[i])) for i in range(n)]
                if sparse and bool(owned.all()):
                    for i in range(n):
                        if bool((coef[i] != 0).any()):
                            d_over[i][name] = 1.0
            else:
                sw = mech.score_weights(name, shape)
                assert sw is not None
                coefs = [lam_w * weights[i] * sw[i] for i in range(n)]
            for i, c in enumerate(coefs):
                lo, hi, mean = float(c.min()), float(c.max()), float(c.double().mean())
                if hi - lo > 1e-9:
                    notes.append(
                        f"{name}: expert {i} coefficient varies within the tensor in [{lo:.4g}, {hi:.4g}]; "
                        f"exported the mean {mean:.4g}"
                    )
                if abs(mean - default_w[i]) > 1e-12:
                    w_over[i][name] = mean
        touched = sorted({k for d in (*w_over, *d_over) for k in d})
        _check_filters(touched, [*shapes, *mech.space.aliases])

    models = []
    for group in _repeated_inputs(experts):
        w_default, w_filters = _combine_repeated(cfg.method, experts, group, default_w, w_over, notes)
        i = group[0]
        p: dict[str, Any] = {}
        if w_filters:
            p["weight"] = [{"filter": k, "value": _round(v)} for k, v in sorted(w_filters.items())]
            p["weight"].append({"value": _round(w_default)})
        else:
            p["weight"] = _round(w_default)
        if sparse:
            if any(density[j] != density[i] or d_over[j] != d_over[i] for j in group):
                raise WeightPatchError(
                    f"expert {experts[i]} is given {len(group)} times with different densities; mergekit takes each "
                    f"model once, so give it once (with a weight) or with one density"
                )
            if d_over[i]:
                p["density"] = [{"filter": k, "value": v} for k, v in sorted(d_over[i].items())]
                p["density"].append({"value": _round(density[i])})
            else:
                p["density"] = _round(density[i])
        models.append({"model": str(experts[i]), "parameters": p})
    config: dict[str, Any] = {
        "merge_method": cfg.method,
        "base_model": str(base_model),
        "models": models,
        "parameters": params,
        "dtype": dtype,
    }
    if out_dtype is not None:
        config["out_dtype"] = out_dtype
    return ExportReport(config, notes, validate_with_mergekit(config))


def _repeated_inputs(experts: Sequence[str | os.PathLike[str]]) -> list[list[int]]:
    """Expert indices grouped by the directory they name (resolved), in first-occurrence order."""
    groups: dict[str, list[int]] = {}
    for i, path in enumerate(experts):
        key = os.path.realpath(Path(path).expanduser())
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _combine_repeated(
    method: str,
    experts: Sequence[str | os.PathLike[str]],
    group: list[int],
    default_w: list[float],
    w_over: list[dict[str, float]],
    notes: list[str],
) -> tuple[float, dict[str, float]]:
    """One mergekit entry for an expert given several times (mergekit refuses "Duplicate merge
    inputs"): its weights summed, per tensor filter. Exact for the linear and TIES formulas, since
    copies share one delta (``sum_c w_c * delta = (sum_c w_c) * delta``, the same sign election,
    the same masks and divisor) as long as the copies' weights do not have opposite signs, which
    consensus methods refuse. DARE draws an independent drop mask per copy in ours: noted."""
    filters = sorted({f for i in group for f in w_over[i]})
    per_copy = [[w_over[i].get(f, default_w[i]) for f in filters] + [default_w[i]] for i in group]
    combined = [sum(values) for values in zip(*per_copy, strict=True)]
    if len(group) > 1:
        if method in ("ties", "dare_ties") and any(min(v) < 0 < max(v) for v in zip(*per_copy, strict=True)):
            raise WeightPatchError(
                f"expert {experts[group[0]]} is given {len(group)} times with weights of opposite signs; "
                f"mergekit takes each model once, so give it once with one weight"
            )
        notes_text = f"expert {experts[group[0]]} given {len(group)} times: exported once with the summed weights"
        if method.startswith("dare"):
            notes.append(notes_text + " (ours drops each copy with its own random mask)")
        logger.warning("%s", notes_text)
    default = combined[-1]
    return default, {f: v for f, v in zip(filters, combined, strict=False) if abs(v - default) > 1e-12}


def validate_with_mergekit(config: dict[str, Any]) -> bool:
    """Load ``config`` with mergekit's own config model when mergekit is installed (True when it
    was checked, False when mergekit is absent). A rejection is a weightpatch bug: raised with
    mergekit's first complaint."""
    try:
        from mergekit.config import MergeConfiguration
    except ImportError:
        return False
    try:
        MergeConfiguration.model_validate(config)
    except Exception as exc:  # pydantic's ValidationError, or mergekit's own ValueError
        first = str(exc).strip().splitlines()
        raise WeightPatchError(
            f"mergekit rejects the exported config ({' '.join(first[:3])}); please report this weightpatch bug"
        ) from exc
    return True


def write_mergekit_yaml(
    path: str | os.PathLike[str],
    merge: MergeConfig | MechanismMerge,
    base_model: str | os.PathLike[str],
    experts: Sequence[str | os.PathLike[str]],
    **kwargs: Any,
) -> ExportReport:
    """Write :func:`mergekit_config` to ``path`` (approximations as a comment header)."""
    report = mergekit_config(merge, base_model, experts, **kwargs)
    header = "# mergekit config written by weightpatch"
    header += " (validated by mergekit's config model)\n" if report.validated else "\n"
    if report.approximations:
        header += "# NOT EXACT -- approximations:\n" + "".join(f"#  - {a}\n" for a in report.approximations)
    Path(path).write_text(header + yaml.safe_dump(report.config, sort_keys=False))
    return report
