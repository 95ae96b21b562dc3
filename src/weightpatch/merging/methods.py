"""Tensor-level merge formulas: task arithmetic, TIES, DARE (linear), DARE-TIES, dataless
Localize-and-Stitch, TALL-mask consensus and layer swapping (registered, with their formulas and
defaults, in :mod:`weightpatch.merging.registry`).

Every function takes the base tensor and a list of expert tensors of the same shape and returns
the merged tensor in the base tensor's dtype. Work is done in float32 (float64 inputs stay float64).
Task vectors are ``delta_i = expert_i - base``.

The formulas follow mergekit's ``GeneralizedTaskArithmeticMerge`` (mergekit 0.1.5,
``mergekit/merge_methods/generalized_task_arithmetic.py`` and ``mergekit/sparsify.py``)::

    delta_i   = sparsify(expert_i - base)                 # none / magnitude top-k / random drop
    wd_i      = w_i * delta_i                              # per-expert weight (scalar or tensor)
    # TIES consensus ("sum" method): elected sign per entry, ties (sum == 0) count as +
    sign      = +1 if sum_i wd_i >= 0 else -1
    mask_i    = sign(wd_i) == sign                         # zero entries never agree
    mixed     = sum_i wd_i * mask_i                        # (no consensus: mask_i = 1)
    divisor   = sum_i w_i * mask_i    (0 -> 1)             # (no consensus: sum_i w_i, |.|<1e-8 -> 1)
    mixed     = mixed / divisor  if normalize
    merged    = base + lam * mixed

``lam`` is mergekit's ``lambda`` parameter. Defaults for ``normalize`` are mergekit's:
``False`` for task arithmetic, DARE and DARE-TIES, ``True`` for TIES (with unit weights and
``normalize=True`` TIES is the paper's disjoint mean over the experts agreeing with the
elected sign).

Differences from mergekit, on purpose:

* weights may be tensors broadcastable to the parameter (per-entry coefficients, used by the
  mechanism-aware merge); mergekit weights are one scalar per model and tensor.
* DARE's random drop uses a generator seeded from ``(seed, tensor name, expert index)``, so a
  merge is reproducible; mergekit draws from torch's global RNG, so its masks differ from ours
  (same distribution). DARE rescales survivors by ``1 / (1 - p)`` by default (the DARE paper);
  mergekit >= 0.1 rescales the masked delta to the original L1 norm (``rescale="l1"`` here).
* ``p`` (``drop_rate``) is the drop probability; mergekit's ``density`` is ``1 - p``.
* computation is float32 regardless of input dtype (mergekit uses its ``dtype`` option; the
  export writes ``dtype: float32`` so both agree).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from weightpatch.errors import WeightPatchError
from weightpatch.merging.registry import METHODS, default

Weight = float | torch.Tensor
Weights = Sequence[Weight] | None
Rescale = Literal["inverse", "l1", "none"]
Method = str  # one of METHODS (the registry)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def task_vectors(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``expert_i - base`` in the working dtype (float32), after checking shapes."""
    if not experts:
        raise WeightPatchError("a merge needs at least one expert tensor")
    dt = _work_dtype(base)
    b = base.to(dt)
    out = []
    for i, e in enumerate(experts):
        if tuple(e.shape) != tuple(base.shape):
            raise WeightPatchError(f"expert {i} tensor has shape {tuple(e.shape)}, the base has {tuple(base.shape)}")
        out.append(e.to(dt) - b)
    return out


def _per_expert(value: float | Sequence[float], n: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise WeightPatchError(f"{len(values)} {what} values given for {n} experts")
    return values


def _weights(weights: Weights, n: int, like: torch.Tensor) -> list[torch.Tensor]:
    if weights is None:
        weights = [1.0] * n
    if len(weights) != n:
        raise WeightPatchError(f"{len(weights)} weights given for {n} experts")
    return [torch.as_tensor(w, dtype=like.dtype).expand_as(like) for w in weights]


# ---- sparsification ------------------------------------------------------------------------------
def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k = max(1, int(density * numel))`` entries of largest magnitude, zero the rest
    (mergekit ``sparsify.magnitude`` without rescaling). ``density >= 1`` keeps everything,
    ``density <= 0`` zeros everything. Ties in magnitude are broken by ``torch.topk`` order.
    Memory: the magnitudes plus the ``k`` kept values and indices (no full sort)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    trimmed = torch.zeros_like(flat)
    trimmed[keep] = flat[keep]
    return trimmed.reshape(delta.shape)


def dare_seed(seed: int, name: str, expert: int) -> int:
    """The generator seed for one expert's delta of one tensor (stable across processes)."""
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{expert}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def dare_drop(
    delta: torch.Tensor, p: float, generator: torch.Generator | None = None, rescale: Rescale = "inverse"
) -> torch.Tensor:
    """Drop each entry independently with probability ``p`` (an entry survives when
    ``u >= p`` for ``u ~ U[0, 1)`` drawn from ``generator``), then rescale the survivors:
    ``"inverse"`` multiplies by ``1 / (1 - p)`` (DARE paper), ``"l1"`` restores the L1 norm of
    ``delta`` (mergekit ``rescale: true``), ``"none"`` leaves them."""
    if not 0 <= p < 1:
        raise WeightPatchError(f"DARE drop rate must be in [0, 1), got {p}")
    if p == 0:
        return delta
    u = torch.rand(delta.shape, generator=generator, dtype=torch.float64)
    kept = delta * (u >= p).to(delta.dtype)
    if rescale == "inverse":
        return kept / (1 - p)
    if rescale == "l1":
        before, after = delta.abs().sum(), kept.abs().sum()
        if before < 1e-7 or after < 1e-7:
            return kept
        return kept * (before / after)
    return kept


# ---- mixing --------------------------------------------------------------------------------------
def elect_sign(weighted_deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election (mergekit consensus ``sum``): +1 where the sum of the weighted deltas
    is >= 0, else -1."""
    total = torch.stack(list(weighted_deltas)).sum(0)
    return (total >= 0).to(total.dtype) * 2 - 1


_CHUNK_ENTRIES = 1 << 22  # element-wise mixing runs on row blocks of about this many entries


def _mix(
    deltas: Sequence[torch.Tensor],
    weights: Weights,
    *,
    consensus: bool,
    normalize: bool,
) -> torch.Tensor:
    """Weighted (optionally sign-consensus, optionally normalized) sum of deltas. Every step is
    element-wise, so large tensors are mixed in row blocks: the temporaries stay a few blocks in
    size instead of several copies of the whole tensor."""
    ws = _weights(weights, len(deltas), deltas[0])
    first = deltas[0]
    if first.dim() == 0 or first.numel() <= _CHUNK_ENTRIES:
        return _mix_block(deltas, ws, consensus, normalize)
    rows = max(1, _CHUNK_ENTRIES // (first.numel() // first.shape[0]))
    out = torch.empty_like(first)
    for i in range(0, first.shape[0], rows):
        block = slice(i, i + rows)
        out[block] = _mix_block([d[block] for d in deltas], [w[block] for w in ws], consensus, normalize)
    return out


def _mix_block(
    deltas: Sequence[torch.Tensor], ws: Sequence[torch.Tensor], consensus: bool, normalize: bool
) -> torch.Tensor:
    wd = torch.stack([w * d for w, d in zip(ws, deltas, strict=True)])
    wt = torch.stack(list(ws))
    if consensus:
        sign = elect_sign(list(wd))
        mask = (wd.sign() == sign).to(wd.dtype)
        mixed = (wd * mask).sum(0)
        divisor = (wt * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = wd.sum(0)
        divisor = wt.sum(0).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed


def task_arithmetic(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Weights = None,
    lam: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """``base + lam * sum_i w_i * (expert_i - base)``; with ``normalize`` the sum is divided by
    ``sum_i w_i`` (mergekit ``task_arithmetic``; ``normalize: true`` makes it a weighted mean)."""
    deltas = task_vectors(base, experts)
    mixed = _mix(deltas, weights, consensus=False, normalize=normalize)
    return (base.to(mixed.dtype) + lam * mixed).to(base.dtype)


def ties(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Weights = None,
    density: float | Sequence[float] = 1.0,
    lam: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """TIES-merging: trim each delta to its top ``density`` fraction by magnitude, elect the sign
    of each entry from the sum of the weighted trimmed deltas, average (``normalize``: divide by
    the summed weights of) the experts agreeing with it, scale by ``lam``."""
    deltas = task_vectors(base, experts)
    dens = _per_expert(density, len(deltas), "density")
    trimmed = [magnitude_trim(d, k) for d, k in zip(deltas, dens, strict=True)]
    del deltas  # the untrimmed copies are not needed while mixing (peak memory of large tensors)
    mixed = _mix(trimmed, weights, consensus=True, normalize=normalize)
    return (base.to(mixed.dtype) + lam * mixed).to(base.dtype)


def _dare_deltas(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    p: float | Sequence[float],
    seed: int,
    name: str,
    rescale: Rescale,
) -> list[torch.Tensor]:
    deltas = task_vectors(base, experts)
    ps = _per_expert(p, len(deltas), "drop rate")
    out = []
    for i, (d, pi) in enumerate(zip(deltas, ps, strict=True)):
        g = torch.Generator().manual_seed(dare_seed(seed, name, i))
        out.append(dare_drop(d, pi, g, rescale))
    return out


def dare_linear(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Weights = None,
    p: float | Sequence[float] = 0.5,
    lam: float = 1.0,
    normalize: bool = False,
    seed: int = 0,
    name: str = "",
    rescale: Rescale = "inverse",
) -> torch.Tensor:
    """DARE then task arithmetic (mergekit ``dare_linear``): drop each delta entry with
    probability ``p``, rescale the survivors, then ``base + lam * sum_i w_i * delta_i``.
    Deterministic given ``seed`` and ``name`` (the tensor's name)."""
    deltas = _dare_deltas(base, experts, p, seed, name, rescale)
    mixed = _mix(deltas, weights, consensus=False, normalize=normalize)
    return (base.to(mixed.dtype) + lam * mixed).to(base.dtype)


def dare_ties(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Weights = None,
    p: float | Sequence[float] = 0.5,
    lam: float = 1.0,
    normalize: bool = False,
    seed: int = 0,
    name: str = "",
    rescale: Rescale = "inverse",
) -> torch.Tensor:
    """DARE sparsification with TIES sign election (mergekit ``dare_ties``; note mergekit's
    default ``normalize`` is False here, so agreeing deltas are summed, not averaged)."""
    deltas = _dare_deltas(base, experts, p, seed, name, rescale)
    mixed = _mix(deltas, weights, consensus=True, normalize=normalize)
    return (base.to(mixed.dtype) + lam * mixed).to(base.dtype)


def localize_stitch(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Weights = None,
    density: float | Sequence[float] = 0.1,
    lam: float = 1.0,
) -> torch.Tensor:
    """A localization baseline: dataless Localize-and-Stitch (He et al. 2024, arXiv 2408.13656).
    Each delta is *localized* to its top ``density`` fraction by magnitude (``m_i``: the entries
    kept with a nonzero delta), then *stitched*: where localized deltas overlap they are averaged::

        merged = base + lam * sum_i w_i * m_i * delta_i / max(1, sum_i m_i)

    Differences from the paper: the top fraction is taken per tensor (the paper ranks the whole
    model), and there is no data-driven mask training (its "dataless" variant)."""
    deltas = task_vectors(base, experts)
    dens = _per_expert(density, len(deltas), "density")
    trimmed = [magnitude_trim(d, k) for d, k in zip(deltas, dens, strict=True)]
    del deltas
    ws = _weights(weights, len(trimmed), trimmed[0])
    overlap = torch.stack([(t != 0).to(t.dtype) for t in trimmed]).sum(0).clamp(min=1)
    mixed = torch.stack([w * t for w, t in zip(ws, trimmed, strict=True)]).sum(0) / overlap
    return (base.to(mixed.dtype) + lam * mixed).to(base.dtype)


def consensus(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Weights = None,
    lam: float = 1.0,
    tall_lambda: float = 0.6,
    min_agree: int = 2,
) -> torch.Tensor:
    """Consensus merging with TALL masks (Wang et al. 2024, arXiv 2405.07813): the task-arithmetic
    sum ``tau = sum_i w_i delta_i`` kept only on entries that at least ``min_agree`` experts' TALL
    masks select, ``m_i = |w_i delta_i| >= tall_lambda * |tau - w_i delta_i|`` (the entry matters
    to expert ``i`` relative to everyone else's contribution)::

        merged = base + lam * tau * [sum_i m_i >= min_agree]
    """
    deltas = task_vectors(base, experts)
    ws = _weights(weights, len(deltas), deltas[0])
    wd = torch.stack([w * d for w, d in zip(ws, deltas, strict=True)])
    tau = wd.sum(0)
    votes = (wd.abs() >= tall_lambda * (tau - wd).abs()).sum(0)
    mixed = tau * (votes >= min_agree).to(tau.dtype)
    return (base.to(mixed.dtype) + lam * mixed).to(base.dtype)


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a parameter name (``model.layers.3.mlp...`` -> 3), else None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def layer_swap(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    layer_owners: Sequence[int],
    name: str,
    weights: Weights = None,
    lam: float = 1.0,
) -> torch.Tensor:
    """Layer swapping (Bandarkar et al. 2024, arXiv 2410.01335): a tensor of decoder layer ``l`` is
    expert ``layer_owners[l]``'s (``-1``: the base's); tensors outside the decoder layers
    (embeddings, final norm, head) are task arithmetic ``base + lam * sum_i w_i delta_i``."""
    layer = layer_index(name)
    if layer is None:
        return task_arithmetic(base, experts, weights, lam)
    if layer >= len(layer_owners):
        raise WeightPatchError(f"layer_owners gives {len(layer_owners)} layers; {name} is in layer {layer}")
    owner = layer_owners[layer]
    if not -1 <= owner < len(experts):
        raise WeightPatchError(f"layer owner {owner} of layer {layer}: expected -1 (base) to {len(experts) - 1}")
    task_vectors(base, experts)  # shape checks
    return (base if owner == -1 else experts[owner]).clone()


@dataclass(frozen=True)
class MergeConfig:
    """One standard merge, applied tensor by tensor.

    ``weights``: one per expert (default 1.0 each). ``density``: TIES / Localize-and-Stitch keep
    fraction (per expert or one value; None = the method's registered default). ``drop_rate``: DARE
    drop probability ``p``. ``normalize``: None = mergekit's default for the method. ``seed``: DARE
    seed (combined with each tensor name and expert index). ``tall_lambda``, ``min_agree``:
    consensus. ``layer_owners``: layer_swap, the expert of each decoder layer (-1: base).
    """

    method: Method = "task_arithmetic"
    weights: tuple[float, ...] | None = None
    lam: float = 1.0
    density: float | tuple[float, ...] | None = None
    drop_rate: float | tuple[float, ...] = 0.5
    normalize: bool | None = None
    seed: int = 0
    rescale: Rescale = "inverse"
    tall_lambda: float = default("consensus", "tall_lambda")
    min_agree: int = default("consensus", "min_agree")
    layer_owners: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            choices = ", ".join(METHODS)
            raise WeightPatchError(f"unknown merge method {self.method!r}; choose one of {choices}")
        for name in ("weights", "lam", "density", "drop_rate"):
            value = getattr(self, name)
            values = value if isinstance(value, (tuple, list)) else () if value is None else (value,)
            if not all(math.isfinite(float(v)) for v in values):
                raise WeightPatchError(f"merge setting {name}={value!r} is not finite (NaN or inf); give finite values")
        if self.method == "layer_swap" and not self.layer_owners:
            raise WeightPatchError("layer_swap needs layer_owners: the expert of each decoder layer (-1: base)")

    @property
    def normalize_value(self) -> bool:
        return bool(default(self.method, "normalize", False)) if self.normalize is None else self.normalize

    @property
    def density_value(self) -> float | tuple[float, ...]:
        return default(self.method, "density", 1.0) if self.density is None else self.density

    def describe(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["normalize"] = self.normalize_value
        d["density"] = self.density_value
        return d

    def merge_tensor(
        self,
        name: str,
        base: torch.Tensor,
        experts: Sequence[torch.Tensor],
        weights: Weights = None,
    ) -> torch.Tensor:
        """Merge one tensor. ``weights`` overrides ``self.weights`` (e.g. per-entry tensors)."""
        if weights is None and self.weights is not None:
            weights = list(self.weights)
        norm = self.normalize_value
        if self.method == "task_arithmetic":
            return task_arithmetic(base, experts, weights, self.lam, norm)
        if self.method == "ties":
            return ties(base, experts, weights, self.density_value, self.lam, norm)
        if self.method == "localize_stitch":
            return localize_stitch(base, experts, weights, self.density_value, self.lam)
        if self.method == "consensus":
            return consensus(base, experts, weights, self.lam, self.tall_lambda, self.min_agree)
        if self.method == "layer_swap":
            assert self.layer_owners is not None
            return layer_swap(base, experts, self.layer_owners, name, weights, self.lam)
        fn = dare_linear if self.method == "dare_linear" else dare_ties
        return fn(base, experts, weights, self.drop_rate, self.lam, norm, self.seed, name, self.rescale)
