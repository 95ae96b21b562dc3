"""The behaviour objective (docs/method.md, "Behaviour objective and anchor validity"): Weight
Patching scored by the specialized model's own behaviour instead of the vector anchor.

For a prompt x, let ``y(x) = (y_1 .. y_T)`` be the specialized model's greedy response (up to and
including its eos token, at most ``max_new_tokens`` tokens), generated once per run. For any model M:

    B(M, x)   = (1/T) sum_t log p_M(y_t | x, y_<t)        (teacher-forced, nats per token)
    G_B(x)    = B(D, x) - B(R, x)                        (the behaviour gap)
    E_B(C)    = mean_x [ (B(R^(C <- D), x) - B(R, x)) / G_B(x) ]

normalized exactly like the anchor score (:class:`weightpatch.scoring.GapScorer`): 0 = the
receiver's behaviour, 1 = the donor's; with a base receiver ``G_B > 0`` on every prompt where the
greedy response is more likely under the specialized model (the usual case), and a positive
``E_B`` moves the base toward writing the specialized model's answer. Prompts whose ``|G_B|`` is
below ``min_relative_gap`` times the median are left out, as for the anchor.

The readout is the model's head on the last block's output, so the sweep engine serves this
objective as it serves the anchor (:meth:`BehaviourScorer.readout`): a component of block ``l``
re-runs blocks ``l..L-1`` from the cached input of block ``l``, variants stacked, and the head
scores them; the components the head itself uses (final norm, unembedding, a tied embedding) run
the plain way. First-order scores backpropagate through the full forward
(:func:`weightpatch.screening.first_order.gradient_scores` takes any :class:`GapScorer`).
:class:`PlainBackend` is the plain way (one whole-model forward per component), the reference the
engine is tested and timed against.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from weightpatch.components import Component
from weightpatch.errors import WeightPatchError
from weightpatch.generation import generate_ids
from weightpatch.pair import ModelPair
from weightpatch.patch import patched
from weightpatch.results import ScoreTable, score_row
from weightpatch.runner import Batch, run_head
from weightpatch.scoring import GapScorer

DEFAULT_RESPONSE_TOKENS = 32


def specialized_responses(
    pair: ModelPair, texts: Sequence[str], max_new_tokens: int = DEFAULT_RESPONSE_TOKENS, batch_size: int = 16
) -> list[list[int]]:
    """The specialized model's greedy responses (token ids) to model-ready ``texts``."""
    with pair.as_model("specialized") as sft:
        return generate_ids(sft, pair.tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size)


def responses_sha256(texts: Sequence[str], responses: Sequence[Sequence[int]]) -> str:
    """Content hash of the prompts and their responses (what a run directory records)."""
    payload = json.dumps([[t, list(r)] for t, r in zip(texts, responses, strict=True)])
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class TeacherForcedBatch(Batch):
    """Prompt + response token ids, left-padded; ``scored`` (batch, seq) marks the positions whose
    *next* token is a response token (the logits that score the response)."""

    scored: torch.Tensor | None = None


def teacher_forced_batch(
    tokenizer, texts: Sequence[str], responses: Sequence[Sequence[int]], device: torch.device | str = "cpu"
) -> TeacherForcedBatch:
    """The :class:`TeacherForcedBatch` of ``texts`` (model-ready prompts) followed by ``responses``."""
    rows = []
    for text, response in zip(texts, responses, strict=True):
        if not response:
            raise WeightPatchError("an empty response cannot be scored; generate at least one token per prompt")
        prompt_ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        rows.append((list(prompt_ids), list(response)))
    width = max(len(p) + len(r) for p, r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        seq = p + r
        ids[i, width - len(seq) :] = torch.tensor(seq)
        mask[i, width - len(seq) :] = 1
        # the logit at position j predicts token j + 1: the response tokens are the last len(r)
        scored[i, width - len(r) - 1 : width - 1] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return TeacherForcedBatch(ids.to(device), mask.to(device), positions.to(device), scored.to(device))


class BehaviourScorer(GapScorer):
    """Scores patched models by the teacher-forced log-probability of the specialized model's own
    greedy responses (``B`` in the module docstring). ``texts`` are model-ready (rendered) prompts;
    ``responses`` their specialized responses as token ids (default: generated here with
    ``max_new_tokens``)."""

    objective = "behaviour"
    separation_subject = "the specialized model's responses"
    separation_fix = " (the two models answer them alike)"

    def __init__(
        self,
        pair: ModelPair,
        texts: Sequence[str],
        responses: Sequence[Sequence[int]] | None = None,
        batch_size: int = 16,
        min_relative_gap: float = 0.1,
        max_new_tokens: int = DEFAULT_RESPONSE_TOKENS,
    ) -> None:
        if not texts:
            raise WeightPatchError("no prompts to score; the prompt set is empty")
        self.pair, self.texts = pair, list(texts)
        if responses is None:
            responses = specialized_responses(pair, self.texts, max_new_tokens, batch_size)
        if len(responses) != len(self.texts):
            raise WeightPatchError(f"{len(responses)} responses for {len(self.texts)} prompts; give one per prompt")
        self.responses = [list(r) for r in responses]
        self.batches: list[Batch] = [
            teacher_forced_batch(
                pair.tokenizer, self.texts[i : i + batch_size], self.responses[i : i + batch_size], pair.device
            )
            for i in range(0, len(self.texts), batch_size)
        ]
        with torch.no_grad():
            self.measure_references(min_relative_gap)

    @property
    def responses_sha256(self) -> str:
        return responses_sha256(self.texts, self.responses)

    def forward_values(self, model: torch.nn.Module, batch: Batch) -> Float[torch.Tensor, " batch"]:
        """Mean log-probability (nats per token) of each prompt's response under ``model``."""
        return self.response_logprob(model(**batch.kwargs(), use_cache=False).logits, batch)

    def response_logprob(
        self, logits: Float[torch.Tensor, "batch seq vocab"], batch: Batch
    ) -> Float[torch.Tensor, " batch"]:
        """Mean log-probability (nats per token) of each row's response tokens under ``logits``."""
        if not isinstance(batch, TeacherForcedBatch) or batch.scored is None:
            raise TypeError("the behaviour readout needs a TeacherForcedBatch (prompt + response tokens)")
        logprobs = torch.log_softmax(logits[:, :-1].to(self.value_dtype), dim=-1)
        targets = batch.input_ids[:, 1:]
        token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = batch.scored[:, :-1]
        # where, not a product: a padding position's logits may be NaN (fully masked attention rows)
        return torch.where(mask, token_logprobs, 0.0).sum(-1) / mask.sum(-1)

    # ---- the behaviour objective of the sweep engine (weightpatch.engine.objective.Objective) -----

    @property
    def stop(self) -> int:
        """The last block a variant runs: the model's last decoder block (the readout is its head)."""
        return self.pair.space.num_layers - 1

    def readout(self, hidden: Float[torch.Tensor, "rows seq hidden"], batch_index: int) -> Float[torch.Tensor, " rows"]:
        """``B`` of each row from the last block's output: the receiver's head (final norm,
        unembedding, soft-capping: :func:`~weightpatch.runner.run_head`) on each stacked variant in
        turn, so memory holds one batch of logits at a time."""
        batch = self.batches[batch_index]
        n = len(batch)
        return torch.cat(
            [
                self.response_logprob(run_head(self.pair.model, self.pair.space, batch, hidden[i : i + n]), batch)
                for i in range(0, hidden.shape[0], n)
            ]
        )

    def reads_weights(self, component: Component | str) -> bool:
        """The head reads the final norm and the unembedding (and a tied input embedding)."""
        return self.pair.space.acts_after_last_block(component)


class PlainBackend:
    """Exact scores under any objective the plain way (a :class:`weightpatch.backends.Backend`), the
    reference the engine is checked and timed against: for each component, swap its weights in, run
    the whole model on every prompt, restore; each finished component is handed to ``on_result``.
    Rows carry method ``exact``."""

    def __init__(self, scorer: GapScorer) -> None:
        self.scorer = scorer

    def run(
        self,
        components: Sequence[Component | str],
        skip: Iterable[str] | None = None,
        on_result: Callable[[ScoreTable], None] | None = None,
        progress: bool = True,
    ) -> ScoreTable:
        pair, done = self.scorer.pair, set(skip or ())
        todo = [pair.space.validate(c) for c in components]
        todo = [c for c in dict.fromkeys(todo) if c.name not in done]
        tables = []
        with torch.no_grad():
            for c in tqdm(todo, desc=f"exact ({self.scorer.objective})", unit="comp", disable=not progress):
                with patched(pair.model, pair.donor, pair.space, [c]):
                    e = self.scorer.effect(self.scorer.values(pair.model))
                table = ScoreTable.from_rows([score_row(c, "exact", e.mean, e.stderr, e.n_prompts)])
                tables.append(table)
                if on_result is not None:
                    on_result(table)
        return ScoreTable.concat(tables)

    def close(self) -> None:
        """Nothing to release (the scorer's pair belongs to the caller)."""

    def __enter__(self) -> PlainBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
