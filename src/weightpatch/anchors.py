"""Vector anchors (docs/method.md, "Anchor"): a unit vector ``u`` in the residual stream after block
``layer``, read at the last prompt token. The anchor score of a model on a prompt is
``F_a(M, x) = <h_layer(M, x)[last], u>`` (units: residual-stream units along ``u``).

Two constructions (recorded in :attr:`Anchor.method`):

- ``"instruction"`` (instruction vectors, Stolfo et al. 2410.12877): mean over prompts of
  ``h(M_sft, x with instruction) - h(M_sft, x without instruction)``, normalized.
- ``"model_diff"``: mean over prompts of ``h(M_sft, x) - h(M_base, x)``, normalized.

An anchor is valid when it separates the two conditions on held-out prompts (Cohen's d and AUC per
layer, :func:`search_anchor_layer`) and when adding ``alpha * u`` to the base model raises a
behavioural metric (:func:`steering_curve`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from scipy import stats

from weightpatch.errors import WeightPatchError
from weightpatch.pair import ModelPair, Role
from weightpatch.prompts import PromptRecord
from weightpatch.prompts import without_instruction as instruction_free
from weightpatch.results import atomic_output, write_text_atomic
from weightpatch.runner import batches, context_length, encode, model_texts, residual_addition, run_segment

Method = Literal["instruction", "model_diff"]


def prompts_sha256(*groups: Sequence[str]) -> str:
    h = hashlib.sha256()
    for group in groups:
        for text in group:
            h.update(text.encode())
            h.update(b"\0")
        h.update(b"\1")
    return h.hexdigest()


@dataclass
class Anchor:
    vector: Float[torch.Tensor, " hidden"]  # unit norm, float32
    layer: int
    method: Method
    models: dict[str, Any]  # the pair's identities when the anchor was built
    prompts_sha256: str
    metrics: dict[str, float] = field(default_factory=dict)  # held-out separation, etc.

    def __post_init__(self) -> None:
        if not torch.isfinite(self.vector).all():
            raise WeightPatchError(
                f"the layer-{self.layer} anchor vector holds NaN/inf: the residual streams it was built from are "
                "not finite (check the models' weights with `wpatch check`, or use float32); nothing was saved"
            )

    def _facts(self) -> dict[str, Any]:
        return {"layer": self.layer, "method": self.method, "dimension": int(self.vector.shape[0]), **self.metrics}

    def __repr__(self) -> str:
        from weightpatch.display import facts_text

        return f"Anchor({facts_text(self._facts())})"

    def _repr_html_(self) -> str:
        from weightpatch.display import html_card

        return html_card("Anchor", self._facts())

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<path>.safetensors`` (the vector) and ``<path>.json`` (metadata), atomically."""
        path = Path(path).with_suffix("")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "layer": self.layer,
            "method": self.method,
            "models": self.models,
            "prompts_sha256": self.prompts_sha256,
            "metrics": self.metrics,
        }
        with atomic_output(path.with_suffix(".safetensors")) as tmp:
            save_file({"anchor": self.vector.detach().float().cpu().contiguous()}, str(tmp))
        write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, pair: ModelPair | None = None) -> Anchor:
        """Load an anchor; with ``pair``, refuse it unless it was built for the same models."""
        path = Path(path).with_suffix("")
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            vector = load_file(str(path.with_suffix(".safetensors")))["anchor"]
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise WeightPatchError(f"cannot read anchor {path}(.json/.safetensors): {exc}") from exc
        anchor = cls(vector, meta["layer"], meta["method"], meta["models"], meta["prompts_sha256"], meta["metrics"])
        if pair is not None:
            anchor.check_compatible(pair)
        return anchor

    @classmethod
    def from_vector(
        cls, vector: Float[torch.Tensor, " hidden"], layer: int, pair: ModelPair, method: Method = "model_diff"
    ) -> Anchor:
        """An anchor for ``pair`` from a vector of your own (normalized to unit length), read after
        block ``layer``; ``method`` records how the vector was made."""
        vector = vector.detach().float().flatten().cpu()
        norm = float(vector.norm())
        if not math.isfinite(norm) or norm == 0.0:
            raise WeightPatchError(f"anchor vector has norm {norm}; give a finite, non-zero vector")
        anchor = cls(vector / norm, layer, method, pair.identities(), prompts_sha256="")
        anchor.check_compatible(pair)
        return anchor

    def check_compatible(self, pair: ModelPair) -> None:
        hidden = pair.space.dims.hidden_size
        if self.vector.shape != (hidden,):
            raise WeightPatchError(
                f"anchor has dimension {tuple(self.vector.shape)} but the model's hidden size is {hidden}: "
                f"this anchor belongs to another model; build one for this pair with `wpatch anchor`"
            )
        if not 0 <= self.layer < pair.space.num_layers:
            raise WeightPatchError(
                f"anchor layer {self.layer} is out of range for a {pair.space.num_layers}-layer model"
            )
        ours = pair.identities()
        for role in ("base", "specialized"):
            if role not in self.models:
                raise WeightPatchError(
                    f"anchor records no {role} model, so it cannot be checked against this pair; make it with "
                    f"Anchor.from_vector(vector, layer, pair) or build it with search_anchor_layer / build_anchor"
                )
            if self.models[role]["weights_sha256"] != ours[role]["weights_sha256"]:
                raise WeightPatchError(
                    f"anchor was built for a different {role} model ({self.models[role]['source']}, "
                    f"sha256 {self.models[role]['weights_sha256'][:12]}) than the one loaded "
                    f"({ours[role]['source']}, {ours[role]['weights_sha256'][:12]}); rebuild it for this pair"
                )


def last_token_residuals(
    pair: ModelPair,
    texts: Sequence[str],
    layers: Sequence[int],
    role: Role,
    batch_size: int = 16,
    truncate_prompts: bool = False,
) -> Float[torch.Tensor, "prompt layer hidden"]:
    """Residual stream after each block in ``layers`` at each prompt's last token, for ``role``'s
    weights (float32, on CPU). Prompts longer than the model's context are refused, or with
    ``truncate_prompts`` cut to their last tokens (:func:`weightpatch.runner.encode`)."""
    top = max(layers)
    out = []
    limit = context_length(pair.model, pair.tokenizer)
    encoded = encode(pair.tokenizer, texts, pair.device, max_length=limit, truncate=truncate_prompts)
    with pair.as_model(role, streamed=True) as model, torch.no_grad():
        for batch in batches(encoded, batch_size):
            last, inputs = run_segment(
                model, pair.space, batch, stop=top, capture_inputs=[layer + 1 for layer in layers if layer < top]
            )
            per_layer = [last[:, -1] if layer == top else inputs[layer + 1][:, -1] for layer in layers]
            out.append(torch.stack(per_layer, dim=1).float().cpu())
    return torch.cat(out)


def _differences(pair, method, with_instr, without_instr, layers, batch_size, truncate_prompts=False):
    """The two conditions' last-token residuals, each (prompt, layer, hidden)."""
    if method == "instruction":
        if without_instr is None or len(without_instr) != len(with_instr):
            raise WeightPatchError(
                "the 'instruction' anchor needs each prompt also without its instruction (the "
                "'prompt_without_instruction' field) to contrast the two; use method 'model_diff' for plain prompts"
            )
        a = last_token_residuals(pair, with_instr, layers, "specialized", batch_size, truncate_prompts)
        b = last_token_residuals(pair, without_instr, layers, "specialized", batch_size, truncate_prompts)
    elif method == "model_diff":
        a = last_token_residuals(pair, with_instr, layers, "specialized", batch_size, truncate_prompts)
        b = last_token_residuals(pair, with_instr, layers, "base", batch_size, truncate_prompts)
    else:
        raise WeightPatchError(f"unknown anchor method {method!r}; use 'instruction' or 'model_diff'")
    for residuals in (a, b):
        bad = ~torch.isfinite(residuals).all(-1)  # (prompt, layer)
        if bad.any():
            at = [layers[i] for i in bad.any(0).nonzero().flatten().tolist()]
            raise WeightPatchError(
                f"the residual stream is NaN/inf at layers {at} on {int(bad.any(1).sum())} of {len(bad)} prompts: "
                "the models' weights are not finite or overflow in this dtype (check them with `wpatch check`, "
                "or use float32); no anchor was built"
            )
    return a, b


def _direction(
    a: Float[torch.Tensor, "prompt hidden"], b: Float[torch.Tensor, "prompt hidden"], layer: int, method: Method
) -> tuple[Float[torch.Tensor, " hidden"], float]:
    """The anchor direction of one layer: the unit mean difference ``mean(a - b) / |mean(a - b)|`` and
    that norm (residual units). A norm below float32 noise (1e-6 of the mean residual norm of ``a``;
    padding alone moves residuals by about 1e-7) is refused: the two conditions do not differ."""
    direction = (a - b).mean(0)
    norm = float(direction.norm())
    if norm <= 1e-6 * float(a.norm(dim=-1).mean()):
        same = (
            "the prompts with and without the instruction do not differ; check the 'prompt_without_instruction' field"
            if method == "instruction"
            else "the two models do not differ on these prompts; check that the specialized model is the fine-tune"
        )
        raise WeightPatchError(
            f"the two conditions have the same mean residual after block {layer} (the anchor direction has norm "
            f"{norm:.1e}): {same}"
        )
    return direction / norm, norm


def cohens_d(pos: np.ndarray, neg: np.ndarray) -> float:
    """Cohen's d of two samples with the pooled (degrees-of-freedom weighted) standard deviation:
    Student's t of :func:`scipy.stats.ttest_ind` times ``sqrt(1/n_pos + 1/n_neg)``. NaN with fewer
    than two values on a side; +-inf when both samples are constant and their means differ."""
    if len(pos) < 2 or len(neg) < 2:
        return float("nan")
    gap = float(pos.mean() - neg.mean())
    if pos.var() == 0 and neg.var() == 0:
        return float("nan") if gap == 0 else float(np.copysign(np.inf, gap))
    t = stats.ttest_ind(pos, neg, equal_var=True).statistic
    return float(t * np.sqrt(1 / len(pos) + 1 / len(neg)))


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve of ``pos`` over ``neg`` (ties count one half): the Mann-Whitney
    ``U`` of :func:`scipy.stats.mannwhitneyu` divided by ``n_pos * n_neg``."""
    u = stats.mannwhitneyu(pos, neg, alternative="two-sided", method="asymptotic").statistic
    return float(u / (len(pos) * len(neg)))


def _separation(pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
    """Cohen's d, AUC and midpoint accuracy of projections (positive condition should be larger)."""
    mid = (pos.mean() + neg.mean()) / 2
    acc = float(((pos > mid).sum() + (neg <= mid).sum()) / (len(pos) + len(neg)))
    return {
        "cohen_d": cohens_d(pos, neg),
        "auc": roc_auc(pos, neg),
        "accuracy": acc,
        "mean_gap": float(pos.mean() - neg.mean()),
    }


def _conditions(
    pair: ModelPair,
    with_: Sequence[str | PromptRecord],
    without: Sequence[str | PromptRecord] | None,
    method: Method,
    render: str | None,
) -> tuple[list[str], list[str] | None]:
    """The two conditions' model-ready texts (:func:`weightpatch.runner.model_texts`); for the
    instruction method, prompt records give their own instruction-free form when ``without`` is None."""
    if without is None and method == "instruction" and with_ and all(isinstance(r, PromptRecord) for r in with_):
        without = instruction_free(list(with_))  # type: ignore[arg-type]
    texts = model_texts(pair.tokenizer, with_, render)
    return texts, model_texts(pair.tokenizer, without, render) if without is not None else None


def search_anchor_layer(
    pair: ModelPair,
    train_with: Sequence[str | PromptRecord],
    train_without: Sequence[str | PromptRecord] | None,
    heldout_with: Sequence[str | PromptRecord],
    heldout_without: Sequence[str | PromptRecord] | None,
    method: Method = "instruction",
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    truncate_prompts: bool = False,
    render: str | None = None,
) -> tuple[Anchor, pd.DataFrame]:
    """Build a candidate anchor at each layer from the training prompts, measure how well it
    separates the two conditions on held-out prompts, and return the best (largest Cohen's d among
    layers with AUC within 0.02 of the best) with the per-layer table.

    Prompts: prompt records (rendered as the anchor stage renders them; for ``"instruction"`` their
    ``prompt_without_instruction`` is the other condition when ``*_without`` is None), or strings with
    ``render`` (``"auto"``/``"chat"``/``"raw"``), or model-ready strings (a warning when they lack the
    chat template the stage would apply: :func:`weightpatch.runner.model_texts`).

    Default layers: ``range(max(1, n_layers // 5), n_layers, 2)`` as in Stolfo et al., plus the
    last. Block 0 is left out by default (for models of 2+ layers): its output still mostly encodes
    token identity, so prompts that differ in their text separate there without any control state."""
    n = pair.space.num_layers
    first = max(1, n // 5) if n > 1 else 0
    layers = sorted(set(layers if layers is not None else [*range(first, n, 2), n - 1]))
    for layer in layers:
        if not 0 <= layer < n:
            raise WeightPatchError(f"anchor layer {layer} is out of range (the model has layers 0..{n - 1})")
    train_with, train_without = _conditions(pair, train_with, train_without, method, render)
    heldout_with, heldout_without = _conditions(pair, heldout_with, heldout_without, method, render)
    a, b = _differences(pair, method, train_with, train_without, layers, batch_size, truncate_prompts)
    ha, hb = _differences(pair, method, heldout_with, heldout_without, layers, batch_size, truncate_prompts)
    rows, vectors = [], {}
    for i, layer in enumerate(layers):
        u, norm = _direction(a[:, i], b[:, i], layer, method)
        vectors[layer] = u
        sep = _separation((ha[:, i] @ u).numpy(), (hb[:, i] @ u).numpy())
        rows.append({"layer": layer, **sep, "direction_norm": norm})
    table = pd.DataFrame(rows)
    good = table[table["auc"] >= table["auc"].max() - 0.02]
    best = int(good.sort_values("cohen_d", ascending=False).iloc[0]["layer"])
    metrics = table.set_index("layer").loc[best].to_dict()
    anchor = Anchor(
        vectors[best],
        best,
        method,
        pair.identities(),
        prompts_sha256(train_with, train_without or [], heldout_with, heldout_without or []),
        {k: float(v) for k, v in metrics.items()},
    )
    return anchor, table


def build_anchor(
    pair: ModelPair,
    with_instruction: Sequence[str | PromptRecord],
    without_instruction: Sequence[str | PromptRecord] | None,
    layer: int,
    method: Method = "instruction",
    batch_size: int = 16,
    truncate_prompts: bool = False,
    render: str | None = None,
) -> Anchor:
    """An anchor at a fixed layer from one prompt set (no held-out validation); prompts as in
    :func:`search_anchor_layer`."""
    if not 0 <= layer < pair.space.num_layers:
        raise WeightPatchError(
            f"anchor layer {layer} is out of range (the model has layers 0..{pair.space.num_layers - 1})"
        )
    with_instruction, without_instruction = _conditions(pair, with_instruction, without_instruction, method, render)
    a, b = _differences(pair, method, with_instruction, without_instruction, [layer], batch_size, truncate_prompts)
    return Anchor(
        _direction(a[:, 0], b[:, 0], layer, method)[0],
        layer,
        method,
        pair.identities(),
        prompts_sha256(with_instruction, without_instruction or []),
    )


def steering_curve(
    pair: ModelPair,
    anchor: Anchor,
    alphas: Sequence[float],
    metric: Callable[[torch.nn.Module], float],
    scale: float | None = None,
    random_directions: int = 0,
    seed: int = 0,
    references: bool = False,
) -> pd.DataFrame:
    """The behavioural ``metric(model)`` of the base model with ``alpha * scale * u`` added to the
    residual stream after the anchor layer, for each alpha. ``scale`` defaults to 1 residual unit;
    pass the mean anchor gap F(sft) - F(base) to express alpha in gaps.

    Columns: ``alpha, metric, direction, draw``. ``direction`` is ``"anchor"`` for the curve;
    with ``random_directions = n`` also ``"random"`` rows: ``n`` unit directions drawn uniformly
    on the sphere (``seed``), added with the same ``alpha * scale`` for every nonzero alpha (a
    control: any push of that size may change the metric), ``draw`` numbering them. With
    ``references`` two rows with a null alpha give the metric of the unmodified ``"base"`` and
    ``"specialized"`` models (the levels the curve is read against)."""
    rows = []
    unit = 1.0 if scale is None else scale
    vector = anchor.vector.to(pair.device) * unit
    generator = torch.Generator().manual_seed(seed)
    randoms = torch.randn(random_directions, anchor.vector.numel(), generator=generator, dtype=torch.float32)
    randoms = randoms / randoms.norm(dim=1, keepdim=True) * unit
    with pair.as_model("base") as model:
        if references:
            rows.append({"alpha": float("nan"), "metric": float(metric(model)), "direction": "base", "draw": 0})
        for alpha in alphas:
            with residual_addition(model, pair.space, anchor.layer, alpha * vector):
                rows.append({"alpha": float(alpha), "metric": float(metric(model)), "direction": "anchor", "draw": 0})
        for draw, direction in enumerate(randoms):
            for alpha in (a for a in alphas if a != 0):
                added = alpha * direction.to(device=pair.device, dtype=vector.dtype)
                with residual_addition(model, pair.space, anchor.layer, added):
                    value = float(metric(model))
                rows.append({"alpha": float(alpha), "metric": value, "direction": "random", "draw": draw})
    if references:
        with pair.as_model("specialized") as model:
            rows.append({"alpha": float("nan"), "metric": float(metric(model)), "direction": "specialized", "draw": 0})
    return pd.DataFrame(rows, columns=["alpha", "metric", "direction", "draw"])
