"""First-order and integrated-gradient scores of every component at once (docs/method.md,
"Exact, first-order and integrated-gradient scores").

First order (attribution patching carried to weight space), evaluated at the receiver's weights:

    E_hat(c) = mean_x [ sum_{theta in Θ(c)} dF(x)/dtheta * (theta_donor - theta_receiver) / G(x) ]

One backward pass per prompt batch gives every layer, module, head and neuron score. Gradients are
reduced to per-component sums inside a post-accumulate-grad hook and freed at once, and the delta is
read from the donor one parameter at a time, so no full gradient or delta copy is ever held.

Integrated gradients average the gradient along ``theta_receiver + alpha * delta`` (midpoint rule,
``steps`` points) with *every* parameter moving. Over any partition of the parameters the scores
sum to ``mean_x [(F(donor, x) - F(receiver, x)) / G(x)] = 1`` up to the quadrature error
(completeness). They split the whole gap among components, interactions included, and are not an
approximation of the single-component exact score.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from weightpatch.components import KINDS, Component, ComponentSpace, Kind, ParamSlice
from weightpatch.errors import WeightPatchError
from weightpatch.patch import donor_values, patched
from weightpatch.results import ScoreTable, score_row
from weightpatch.scoring import GapScorer


@dataclass
class ParamPlan:
    """How one parameter's grad*delta is reduced into component scores."""

    full: list[int] = field(default_factory=list)  # rows owning the whole tensor
    # rows owning one contiguous range along a dim: dim -> (rows, starts, stops)
    ranges: dict[int, tuple[list[int], list[int], list[int]]] = field(default_factory=dict)
    multi: list[tuple[int, int, tuple[tuple[int, int], ...]]] = field(default_factory=list)
    inside_expert: list[tuple[int, ParamSlice]] = field(default_factory=list)  # rows owning part of one expert


def plan_reduction(space: ComponentSpace, components: list[Component]) -> dict[str, ParamPlan]:
    """For each parameter, which components (row numbers in ``components``) own which part of it."""
    plans: dict[str, ParamPlan] = defaultdict(ParamPlan)
    for row, c in enumerate(components):
        for s in space.resolve(c):
            plan = plans[s.name]
            if s.is_full:
                plan.full.append(row)
            elif s.expert is not None:
                plan.inside_expert.append((row, s))
            elif len(s.ranges) == 1:
                rows, starts, stops = plan.ranges.setdefault(s.dim, ([], [], []))  # type: ignore[arg-type]
                rows.append(row)
                starts.append(s.ranges[0][0])
                stops.append(s.ranges[0][1])
            else:
                plan.multi.append((row, s.dim, s.ranges))  # type: ignore[arg-type]
    return plans


def reduce_into(contrib: torch.Tensor, plan: ParamPlan, scores: torch.Tensor) -> None:
    """Add each owning component's sum of ``contrib`` (grad * delta, float64) into ``scores``."""
    if plan.full:
        scores[plan.full] += contrib.sum()
    for dim, (rows, starts, stops) in plan.ranges.items():
        other = [d for d in range(contrib.dim()) if d != dim]
        along = contrib.sum(dim=other) if other else contrib
        cumulative = torch.nn.functional.pad(along.cumsum(0), (1, 0))
        scores.index_add_(0, torch.tensor(rows), cumulative[stops] - cumulative[starts])
    for row, dim, ranges in plan.multi:
        other = [d for d in range(contrib.dim()) if d != dim]
        along = contrib.sum(dim=other) if other else contrib
        scores[row] += sum(along[a:b].sum() for a, b in ranges)
    for row, piece in plan.inside_expert:
        region = piece.region(contrib)
        scores[row] += sum(region.narrow(piece.dim, a, b - a).sum() for a, b in piece.ranges)  # type: ignore[arg-type]


class _Linear16(torch.autograd.Function):
    """``F.linear`` whose backward computes the input gradient ``g @ W`` as ``F.linear(g, W^T)`` with
    ``W^T`` copied contiguous: on a CPU without native bfloat16 (no AVX512-BF16, where oneDNN is not
    used), PyTorch's ``g @ W`` in 16 bits takes a generic path ~40x slower than the forward's
    ``x @ W^T`` (8192 x 2048 weight, 52 tokens, one thread: 6.5 s vs 0.16 s; through the copy 0.21 s),
    and it set the time of a bfloat16 first-order screen (benchmarks/RESULTS.md, model size). The
    product is the same to the 16-bit rounding of each output (accumulated in float32 either way), not
    bit for bit. The weight gradient is autograd's own formula (``g^T x``)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.nn.functional.linear(grad, weight.t().contiguous())
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            dw = flat.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = flat.sum(0)
        return dx, dw, db


@contextmanager
def fast_16bit_linear_backward(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every ``nn.Linear`` of a 16-bit model on the CPU runs :class:`_Linear16`
    (its forward is unchanged; its backward takes the fast path). No-op for other dtypes and devices."""
    linears = [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear and m.weight.dtype in (torch.bfloat16, torch.float16) and m.weight.is_cpu
    ]

    def forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return _Linear16.apply(x, module.weight, module.bias)

    try:
        for m in linears:
            m.forward = forward.__get__(m)  # type: ignore[method-assign]
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


@contextmanager
def gradient_hooks(
    model: torch.nn.Module, names: Iterable[str], on_grad: Callable[[str, torch.Tensor], None]
) -> Iterator[None]:
    """Within the block, the named parameters require grad and each accumulated gradient is handed
    to ``on_grad(name, param)`` (under ``no_grad``) and freed at once, so no full gradient copy is
    ever held. On exit the hooks are removed and the parameters no longer require grad."""
    params = {name: model.get_parameter(name) for name in names}
    if any(p.device.type == "meta" for p in params.values()):
        raise WeightPatchError(
            "gradient scores need the weights in the module: this model is offloaded by accelerate; "
            "use exact scores, or load it without offload"
        )

    def make_hook(name: str):
        def hook(param: torch.Tensor) -> None:
            with torch.no_grad():
                on_grad(name, param)
            param.grad = None

        return hook

    handles = []
    try:
        for name, p in params.items():
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(make_hook(name)))
        with fast_16bit_linear_backward(model):
            yield
    finally:
        for h in handles:
            h.remove()
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None


def gradient_scores(
    scorer: GapScorer,
    kinds: Iterable[Kind] = KINDS,
    components: Iterable[Component | str] | None = None,
    steps: int = 1,
    progress: bool = True,
    per_prompt: bool = True,
) -> ScoreTable:
    """First-order scores (``steps=1``, gradient at the receiver) or integrated gradients
    (``steps > 1``, midpoint rule along the straight path to the donor) for every component of
    ``kinds`` (or the given ``components``).

    With ``per_prompt`` (default) each prompt's term ``dF(x)/dtheta . delta / G(x)`` is kept
    apart (one backward per prompt over one forward per batch), so ``stderr`` is the standard
    error of the mean across prompts, as for exact scores; this holds a (prompts, components)
    float64 matrix. ``per_prompt=False`` does one backward per batch (faster on large batches,
    same score up to float rounding) and leaves ``stderr`` NaN."""
    pair = scorer.pair
    model, space = pair.model, pair.space
    targets = space.select(kinds, components)
    plans = plan_reduction(space, targets)
    n = int(scorer.valid.sum())
    row_of = torch.cumsum(scorer.valid.long(), 0) - 1  # prompt -> row among valid prompts
    per_row = torch.zeros(n if per_prompt else 1, len(targets), dtype=torch.float64)
    inverse_gap = torch.where(scorer.valid, 1.0 / scorer.gap, torch.zeros_like(scorer.gap))
    weights = inverse_gap if per_prompt else inverse_gap / n
    alphas = [0.0] if steps <= 1 else [(k + 0.5) / steps for k in range(steps)]
    method = "first_order" if steps <= 1 else "integrated_gradients"
    state: dict[str, object] = {"row": 0}

    # one float64 buffer reused for every parameter's grad x delta: a fresh one per parameter cost a
    # page-faulted allocation each time and two passes more (2.8x slower on an 8192 x 2048 bfloat16
    # weight); the same values bit for bit (float64(g) x float64(delta), then / len(alphas))
    work = torch.empty(0, dtype=torch.float64)

    def on_grad(name: str, param: torch.Tensor) -> None:
        nonlocal work
        patch = state.get("patch")
        receiver = patch.original(name) if patch is not None else param.detach()  # type: ignore[attr-defined]
        delta = donor_values(pair.donor, ParamSlice(name), param) - receiver
        grad = param.grad
        assert grad is not None  # the post-accumulate-grad hook runs with it set
        if work.numel() < grad.numel() or work.device != grad.device:
            work = torch.empty(grad.numel(), dtype=torch.float64, device=grad.device)
        contrib = work[: grad.numel()].view(grad.shape).copy_(grad).mul_(delta)
        if len(alphas) > 1:
            contrib.div_(len(alphas))
        reduce_into(contrib, plans[name], per_row[state["row"]])

    with gradient_hooks(model, plans, on_grad):
        bar = tqdm(total=len(alphas) * len(scorer.batches), desc=method, unit="batch", disable=not progress)
        offset_of = [0]
        for b in scorer.batches:
            offset_of.append(offset_of[-1] + len(b))
        for alpha in alphas:
            everything = space.everything() if alpha > 0 else []
            with patched(model, pair.donor, space, everything, alpha=alpha) as patch:
                state["patch"] = patch if alpha > 0 else None
                for i, b in enumerate(scorer.batches):
                    prompts = range(offset_of[i], offset_of[i + 1])
                    w = weights[prompts.start : prompts.stop].to(pair.device)
                    terms = scorer.forward_values(model, b) * w
                    if not per_prompt:
                        terms.sum().backward()
                    else:
                        valid = [j for j, p in enumerate(prompts) if scorer.valid[p]]
                        for position, j in enumerate(valid):
                            state["row"] = int(row_of[prompts.start + j])
                            terms[j].backward(retain_graph=position < len(valid) - 1)
                    bar.update(1)
        bar.close()
    if per_prompt:
        scores = per_row.mean(0)
        stderr = per_row.std(0) / n**0.5 if n > 1 else torch.full_like(scores, float("nan"))
    else:
        scores, stderr = per_row[0], torch.full((len(targets),), float("nan"), dtype=torch.float64)
    return ScoreTable.from_rows(
        score_row(c, method, float(s), float(e), n) for c, s, e in zip(targets, scores, stderr, strict=True)
    )
