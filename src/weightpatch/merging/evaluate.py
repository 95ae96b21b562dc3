"""Merge evaluation: one table comparing the base, each expert and each merge on every expert's capability.

A :class:`Capability` is one expert's skill, measured two ways on its own prompts:

- **anchor recovery**: the expert's own anchor (built on its own ``(base, expert)`` pair) read on a
  candidate model ``M``; ``E(M) = mean_x (F(M, x) - F(base, x)) / (F(expert, x) - F(base, x))``, the
  fraction of that expert's anchor gap the model reaches (:meth:`AnchorScorer.effect`; base = 0,
  expert = 1, tiny gaps excluded as in scoring);
- **strict accuracy**: the capability's checker on greedy generations (IFEval strict, prompt level;
  by default :func:`weightpatch.checkers.strict_prompt_accuracy` over the registered checkers);
- **KL to the expert** (optional): mean ``KL(P_expert || P_M)`` of next-token distributions over the
  expert's own greedy responses, teacher-forced (nats per response token).

:func:`evaluate_models` fills the table for any models (loaded with :func:`weightpatch.loading.load_model`,
as the pair is: hub ids at a revision, GGUF, adapters on the base; they must share the capability's
architecture and tokenizer).
:func:`default_mergers` gives the baselines and the mechanism-aware merges, :func:`capability_scores`
an expert's Weight Patching scores for the latter, :func:`merge_report` runs the merges and the table.

    caps = [build_capability("format", base, fmt_expert, with_i, without_i, records=..., layer=2), ...]
    scores = [capability_scores(c) for c in caps]
    table = merge_report(caps, base, "merges/", scores=scores)
    print(wide_table(table))
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from weightpatch.checkers import strict_prompt_accuracy
from weightpatch.errors import WeightPatchError
from weightpatch.loading import load_model
from weightpatch.scoring import AnchorScorer

Checker = Callable[[Sequence[Any], Sequence[str]], float]


@dataclass
class Capability:
    """One expert's capability: its anchor scorer (on its own pair), behavioural prompts and checker."""

    name: str
    base: Path
    expert: Path
    scorer: AnchorScorer
    records: list[Any] | None = None
    checker: Checker | None = strict_prompt_accuracy
    max_new_tokens: int = 96
    batch_size: int = 16
    _reference: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def tokenizer(self):
        return self.scorer.pair.tokenizer


def build_capability(
    name: str,
    base: str | os.PathLike,
    expert: str | os.PathLike,
    with_instruction: Sequence[str],
    without_instruction: Sequence[str] | None = None,
    *,
    layer: int | None = None,
    heldout_with: Sequence[str] | None = None,
    heldout_without: Sequence[str] | None = None,
    method: str | None = None,
    score_prompts: Sequence[str] | None = None,
    records: Sequence[Any] | None = None,
    checker: Checker | None = strict_prompt_accuracy,
    max_new_tokens: int = 96,
    batch_size: int = 16,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Capability:
    """Load the ``(base, expert)`` pair and build the expert's anchor and scorer.

    Prompts are raw (rendered with the tokenizer's chat template here). The anchor is built at
    ``layer`` from ``with_instruction`` (and ``without_instruction``: the ``instruction`` method;
    without them ``model_diff``), or, with ``layer=None`` and held-out prompts, at the layer
    :func:`~weightpatch.anchors.search_anchor_layer` picks (``layer=None`` without held-out prompts:
    the last layer). Recovery is measured on ``score_prompts`` (default ``with_instruction``).
    ``revision`` and ``trust_remote_code`` are :func:`~weightpatch.pair.load_pair`'s; the evaluation
    loads every model with them (:func:`evaluate_models`).
    """
    from weightpatch.anchors import build_anchor, search_anchor_layer
    from weightpatch.pair import load_pair
    from weightpatch.runner import render_prompts

    pair = load_pair(base, expert, revision=revision, trust_remote_code=trust_remote_code)
    tok = pair.tokenizer
    method = method or ("instruction" if without_instruction is not None else "model_diff")

    def render(texts):
        return None if texts is None else render_prompts(tok, list(texts))

    w, wo = render(with_instruction), render(without_instruction)
    if layer is None and heldout_with is not None:
        anchor, _ = search_anchor_layer(
            pair, w, wo, render(heldout_with), render(heldout_without), method=method, batch_size=batch_size
        )
    else:
        layer = pair.space.num_layers - 1 if layer is None else layer
        anchor = build_anchor(pair, w, wo, layer, method=method, batch_size=batch_size)
    scorer = AnchorScorer(pair, anchor, render(score_prompts) if score_prompts is not None else w, batch_size)
    return Capability(
        name, Path(base), Path(expert), scorer, list(records) if records is not None else None, checker,
        max_new_tokens, batch_size,
    )  # fmt: skip


def capability_scores(
    capability: Capability,
    kinds: Sequence[str] = ("module", "head", "neuron"),
    top_k: int = 20,
    method: str = "exact",
    progress: bool = False,
) -> pd.DataFrame:
    """The expert's Weight Patching scores for its own capability (screen-then-verify on its own
    scorer): ``component``/``score`` rows of ``method`` (``exact``: the verified ``top_k`` per kind;
    ``first_order``: every component)."""
    from weightpatch.screening.verify import screen_then_verify

    table, _ = screen_then_verify(capability.scorer, kinds=tuple(kinds), top_k=top_k, progress=progress)
    frame = table.select(method=method).to_pandas()
    return frame[["component", "score"]].reset_index(drop=True)


def default_mergers(
    base: str | os.PathLike,
    scores: Sequence[Any] | None = None,
    *,
    top_k: int = 10,
    density: float = 0.5,
    drop_rate: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """The merges of the report: task arithmetic (unit weights, ``lam=1``), TIES (``density``),
    DARE-TIES (``drop_rate``), and with ``scores`` (one table per expert) the mechanism-aware
    ``owner_takes_top`` (each expert's ``top_k`` components, task arithmetic elsewhere) and
    ``score_weighted`` (task arithmetic with per-entry weights ``max(0.3, normalized score)``)."""
    from weightpatch.merging.mechanism import component_space_for_checkpoint, owner_takes_top, score_weighted
    from weightpatch.merging.methods import MergeConfig

    mergers: dict[str, Any] = {
        "task_arithmetic": MergeConfig("task_arithmetic"),
        "ties": MergeConfig("ties", density=density),
        "dare_ties": MergeConfig("dare_ties", drop_rate=drop_rate, seed=seed),
    }
    if scores is not None:
        space = component_space_for_checkpoint(base)
        mergers["owner_takes_top"] = owner_takes_top(space, scores, top_k=top_k)
        mergers["score_weighted"] = score_weighted(space, scores)
    return mergers


def _response_batches(tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int):
    """Right-padded (input_ids, attention_mask, predicts_response) batches of prompt + response."""
    from weightpatch.runner import render_prompts

    rows = []
    for text, resp in zip(render_prompts(tokenizer, list(prompts)), responses, strict=True):
        p = tokenizer(text, add_special_tokens=True)["input_ids"]
        r = tokenizer(resp, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            r = [*r, tokenizer.eos_token_id]
        rows.append((p, r))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        length = max(len(p) + len(r) for p, r in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        target = torch.zeros((len(chunk), length), dtype=torch.bool)
        for j, (p, r) in enumerate(chunk):
            ids[j, : len(p) + len(r)] = torch.tensor(p + r)
            mask[j, : len(p) + len(r)] = 1
            target[j, len(p) - 1 : len(p) + len(r) - 1] = True  # positions predicting response tokens
        out.append((ids, mask, target))
    return out


@torch.no_grad()
def _response_logprobs(model, batches) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    out = []
    for ids, mask, target in batches:
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        out.append(torch.log_softmax(logits.float(), -1)[target.to(device)].cpu())
    return out


def _generate(model, tokenizer, capability: Capability) -> list[str]:
    from weightpatch.generation import generate

    prompts = [r["prompt"] if isinstance(r, dict) else r.prompt for r in capability.records or []]
    return generate(model, tokenizer, prompts, max_new_tokens=capability.max_new_tokens)


def _reference(capability: Capability) -> dict[str, Any]:
    """The expert's greedy responses on the capability's records and its log-probs on them."""
    if capability._reference is None:
        expert = _load(capability.expert, torch.float32, capability.base, capability.scorer.pair.options)
        responses = _generate(expert, capability.tokenizer, capability)
        prompts = [r["prompt"] if isinstance(r, dict) else r.prompt for r in capability.records or []]
        batches = _response_batches(capability.tokenizer, prompts, responses, capability.batch_size)
        capability._reference = {
            "responses": responses,
            "batches": batches,
            "logp": _response_logprobs(expert, batches),
        }
        del expert
    return capability._reference


def _load(path: str | os.PathLike, dtype: torch.dtype, base: str | os.PathLike, options: Mapping[str, Any]):
    """A model of the table through the one loader: ``options``' revision (for hub ids only: merged
    outputs and local experts are directories) and remote-code opt-in; an adapter on ``base``."""
    revision = options.get("revision") if not Path(path).expanduser().exists() else None
    trust = bool(options.get("trust_remote_code", False))
    model, _ = load_model(path, dtype=dtype, revision=revision, trust_remote_code=trust, base=base)
    return model


def evaluate_model(model, capability: Capability, *, behaviour: bool = True, kl: bool = True) -> dict[str, Any]:
    """One row: ``model``'s anchor recovery on the capability, strict accuracy, KL to the expert."""
    scorer = capability.scorer
    with torch.no_grad():
        effect = scorer.effect(scorer.anchor_scores(model))
    row: dict[str, Any] = {
        "capability": capability.name,
        "anchor_recovery": effect.mean,
        "recovery_stderr": effect.stderr,
        "n_prompts": effect.n_prompts,
        "strict_accuracy": math.nan,
        "kl_to_expert": math.nan,
    }
    if capability.records and behaviour and capability.checker is not None:
        responses = _generate(model, capability.tokenizer, capability)
        row["strict_accuracy"] = float(capability.checker(capability.records, responses))
    if capability.records and kl:
        ref = _reference(capability)
        got = _response_logprobs(model, ref["batches"])
        total = sum(float((r.exp() * (r - g)).sum()) for r, g in zip(ref["logp"], got, strict=True))
        count = sum(r.shape[0] for r in ref["logp"])
        row["kl_to_expert"] = total / max(count, 1)
    return row


def evaluate_models(
    capabilities: Sequence[Capability],
    models: Mapping[str, str | os.PathLike],
    *,
    behaviour: bool = True,
    kl: bool = True,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """The long table: one row per (model, capability) with ``anchor_recovery``, ``recovery_stderr``,
    ``n_prompts``, ``strict_accuracy`` (NaN without records/checker) and ``kl_to_expert`` (NaN
    without records or with ``kl=False``). ``models``: name -> checkpoint directory, in row order."""
    if not capabilities:
        raise WeightPatchError("no capabilities to evaluate")
    pair = capabilities[0].scorer.pair
    rows = []
    for name, path in models.items():
        if progress is not None:
            progress(name)
        model = _load(path, dtype, capabilities[0].base, pair.options)
        for cap in capabilities:
            rows.append({"model": name, **evaluate_model(model, cap, behaviour=behaviour, kl=kl)})
        del model
    return pd.DataFrame(rows)


def merge_report(
    capabilities: Sequence[Capability],
    base: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    scores: Sequence[Any] | None = None,
    mergers: Mapping[str, Any] | None = None,
    top_k: int = 10,
    behaviour: bool = True,
    kl: bool = True,
    progress: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Merge the capabilities' experts (in order) onto ``base`` with each of ``mergers`` (default
    :func:`default_mergers` with ``scores``) into ``out_dir/<name>``, then evaluate the base, each
    expert alone and each merge on every capability (:func:`evaluate_models`)."""
    from weightpatch.merging.stream import merge_checkpoints

    experts = [c.expert for c in capabilities]
    for cap in capabilities:
        if Path(cap.base).resolve() != Path(base).resolve():
            raise WeightPatchError(f"capability {cap.name!r} was built on base {cap.base}, not {base}")
    mergers = dict(mergers) if mergers is not None else default_mergers(base, scores, top_k=top_k)
    models: dict[str, Path] = {"base": Path(base)}
    models.update({f"expert:{c.name}": c.expert for c in capabilities})
    for name, merger in mergers.items():
        if progress is not None:
            progress(f"merge {name}")
        models[f"merge:{name}"] = merge_checkpoints(base, experts, Path(out_dir) / name, merger, overwrite=True)
    return evaluate_models(capabilities, models, behaviour=behaviour, kl=kl, progress=progress)


def wide_table(frame: pd.DataFrame, columns: Sequence[str] = ("anchor_recovery", "strict_accuracy", "kl_to_expert")):
    """One row per model, ``<capability> <column>`` columns (models and capabilities in input order)."""
    caps = list(dict.fromkeys(frame["capability"]))
    wide = frame.pivot(index="model", columns="capability", values=list(columns))
    wide = wide.reindex(list(dict.fromkeys(frame["model"])))
    ordered = [(col, cap) for cap in caps for col in columns]
    wide = wide[ordered]
    wide.columns = [f"{cap} {col}" for col, cap in ordered]
    return wide.reset_index()
