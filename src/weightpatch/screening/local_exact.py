"""Local-exact scores: exact inside the component's own block, linear above it (issue 21).

For a component ``c`` whose first affected block is ``l`` (see
:meth:`~weightpatch.components.ComponentSpace.first_affected_layer`) and the anchor layer ``a``:

    F_hat(c, x) = F(R, x) + sum_{pos, hidden} g_l(x) * (h_l(R^(c <- D), x) - h_l(R, x))
    g_l(x)      = dF(R, x) / dh_l                      (gradient at the receiver, every position)

``h_l`` is the residual stream after block ``l``. Block ``l`` runs exactly with ``c`` patched, on the
receiver's cached input of block ``l`` (the :class:`~weightpatch.screening.exact.ExactScreen` cache), so
every nonlinearity inside the patched block (softmax, gating, norms) is exact; only blocks
``l+1..a`` are linearized. One backward pass per prompt batch gives ``g_l`` for every ``l``.
With ``exact_blocks = k`` the ``k - 1`` receiver blocks above block ``l`` also run exactly (stacked
variants, as in the exact sweep) and the gradient is taken after block ``l + k - 1``: ``k = 1`` is
the cheapest, ``k > a - l`` is the exact score (neurons: their own block only, see below).
Components of the anchor's own block are scored exactly (``F`` reads ``h_a`` linearly), components
that cannot reach the anchor score 0. Embedding components (``l = 0``) run the embedding and block 0
exactly. The effect is normalized as the exact score (:meth:`AnchorScorer.effect`: fraction of the
gap, tiny-gap prompts excluded).

Neurons of a layer below the anchor take the batched neuron path
(:class:`~weightpatch.screening.neurons.NeuronScreen`): the down-projection inputs ``a_j`` under base
and donor input weights for all neurons at once (two MLP runs per batch), and each neuron's change
of the MLP output, ``a_j^D w_j^D - a_j^R w_j^R``, carried with the gradient of ``F`` with respect to
the MLP output:

    F_hat(j, x) - F(R, x) = sum_pos [ a_j^D(pos) <g_mlp(pos), w_j^D> - a_j^R(pos) <g_mlp(pos), w_j^R> ]

Where the MLP output is added straight to the residual stream (Llama, Qwen, GPT-2, ...), ``g_mlp = g_l``
and this is exactly the formula above; with a norm after the MLP (Gemma2/3's post-feedforward norm)
that norm is linearized too. Anchor-layer neurons are scored exactly by ``NeuronScreen``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from weightpatch.components import KINDS, Component, Kind
from weightpatch.engine import EffectStrategy, Strategy, readout_variants, run_blocks
from weightpatch.errors import WeightPatchError
from weightpatch.patch import patched
from weightpatch.results import ScoreTable
from weightpatch.runner import Batch, decoder_layers, first_tensor, run_segment
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.neurons import NeuronScreen

METHOD = "local_exact"
Gradients = tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]


def residual_gradients(scorer: AnchorScorer, batch: Batch, mlp_paths: dict[int, str]) -> Gradients:
    """Gradients of every prompt's anchor score ``F(R, x)`` (receiver weights) with respect to the
    residual stream after each block ``l < anchor`` and to the outputs of the MLP modules named in
    ``mlp_paths`` (layer -> module path), each (batch, seq, hidden). Prompts do not interact, so one
    backward pass of ``sum_x F(x)`` gives each prompt's own gradient."""
    pair = scorer.pair
    model, space, anchor = pair.model, pair.space, scorer.layer
    blocks = decoder_layers(model, space)
    outputs: dict[int, torch.Tensor] = {}
    mlp_outputs: dict[int, torch.Tensor] = {}

    def leaf_input(_module, args, kwargs):  # the graph starts at the input of block 0
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}

    def keep(store: dict[int, torch.Tensor], layer: int):
        def hook(_module, _args, output) -> None:
            store[layer] = first_tensor(output)

        return hook

    handles = [blocks[0].register_forward_pre_hook(leaf_input, with_kwargs=True)]
    handles += [blocks[layer].register_forward_hook(keep(outputs, layer)) for layer in range(anchor)]
    handles += [model.get_submodule(p).register_forward_hook(keep(mlp_outputs, i)) for i, p in mlp_paths.items()]
    try:
        with torch.enable_grad():
            hidden = run_segment(model, space, batch, stop=anchor, last_position=True)[0]
            targets = [outputs[layer] for layer in range(anchor)] + [mlp_outputs[layer] for layer in mlp_paths]
            grads = torch.autograd.grad(scorer.project(hidden).sum(), targets) if targets else ()
    finally:
        for h in handles:
            h.remove()
    residual = dict(zip(range(anchor), grads[:anchor], strict=True))
    return residual, dict(zip(mlp_paths, grads[anchor:], strict=True))


class _Linearized:
    """The receiver's gradients per prompt batch (one backward each, taken on first use) and the
    prompt offsets of the batches: what both local-exact strategies carry a change to the anchor with."""

    def __init__(self, scorer: AnchorScorer) -> None:
        self.scorer = scorer
        self._gradients: list[Gradients] | None = None
        offsets = [0]
        for b in scorer.batches:
            offsets.append(offsets[-1] + len(b))
        self.offsets = offsets

    def gradients(self, batch_index: int) -> Gradients:
        """(residual gradients by layer, MLP-output gradients by layer) of one prompt batch."""
        if self._gradients is None:
            space = self.scorer.pair.space
            mlps = {layer: space.site(Component("module", layer, "mlp")).module for layer in range(self.scorer.layer)}
            self._gradients = [residual_gradients(self.scorer, b, mlps) for b in self.scorer.batches]
        return self._gradients[batch_index]

    def f_receiver(self, batch_index: int) -> torch.Tensor:
        """The receiver's anchor scores (batch,) of one prompt batch."""
        return self.scorer.f_receiver[self.offsets[batch_index] : self.offsets[batch_index + 1]]


class LocalNeurons(EffectStrategy[Component]):
    """MLP neurons by the batched neuron path (module docstring): a layer's neurons in one group
    below the anchor (linearized from the MLP output), in :class:`NeuronScreen` groups in the
    anchor's own block (exact)."""

    method = METHOD
    variants_per_batch = 2**31  # below the anchor every neuron of a layer is one einsum

    def __init__(self, scorer: AnchorScorer, linear: _Linearized) -> None:
        super().__init__(scorer)
        self.scorer, self.linear, self.exact = scorer, linear, NeuronScreen(scorer)

    def values(self, group: Sequence[Component], layer: int) -> torch.Tensor:
        if layer == self.scorer.layer:
            size = self.exact.variants_per_batch
            return torch.cat([self.exact.values(group[i : i + size], layer) for i in range(0, len(group), size)])
        state = self.exact.layer_state(layer)
        chunk = torch.tensor([c.index for c in group])
        dtype = self.scorer.u.dtype
        w_base, w_donor = state.w_base[chunk].to(dtype), state.w_donor[chunk].to(dtype)
        f = []
        for bi in range(len(self.scorer.batches)):
            a_base, a_donor = state.a_base[bi][..., chunk].to(dtype), state.a_donor[bi][..., chunk].to(dtype)
            g = self.linear.gradients(bi)[1][layer].to(dtype)  # (batch, seq, hidden)
            change = torch.einsum("bsk,bsk->bk", a_donor, g @ w_donor.T) - torch.einsum(
                "bsk,bsk->bk", a_base, g @ w_base.T
            )
            f.append(self.linear.f_receiver(bi)[:, None] + change)
        return torch.cat(f).T


class LocalExactScreen(EffectStrategy[Component]):
    """Local-exact scores on one scorer's prompts and anchor (see the module docstring): the
    weight-slice strategy with the blocks above ``exact_blocks`` linearized, neurons through
    :class:`LocalNeurons`."""

    method = METHOD

    def __init__(self, scorer: AnchorScorer, exact_blocks: int = 1, variants_per_batch: int = 8) -> None:
        if exact_blocks < 1:
            raise WeightPatchError(f"exact_blocks must be at least 1 (the component's own block), got {exact_blocks}")
        super().__init__(scorer)
        self.scorer, self.exact_blocks, self.variants_per_batch = scorer, exact_blocks, variants_per_batch
        scorer.block_inputs()  # cached now, with the receiver's own weights in place
        self.linear = _Linearized(scorer)
        self.neurons = LocalNeurons(scorer, self.linear)
        self._base_outputs: dict[tuple[int, int], torch.Tensor] = {}

    def _base_output(self, layer: int, batch_index: int) -> torch.Tensor:
        """The receiver's output of block ``layer`` on its cached input (call it outside any patch)."""
        key = (layer, batch_index)
        if key not in self._base_outputs:
            self._base_outputs[key] = run_blocks(self.scorer, batch_index, layer, layer)
        return self._base_outputs[key]

    def values(self, group: Sequence[Component], layer: int) -> torch.Tensor:
        """Estimated patched anchor scores (variant, prompt) of components first affecting ``layer``:
        block ``layer`` runs with each component patched alone, then (stacked) the receiver's blocks
        up to ``stop = min(layer + exact_blocks - 1, anchor)``; the change of the residual stream
        after ``stop`` is carried to the anchor with the gradient there (exact when ``stop`` is the
        anchor)."""
        scorer, anchor, n = self.scorer, self.scorer.layer, len(self.scorer.batches)
        stop = min(layer + self.exact_blocks - 1, anchor)
        if stop < anchor:  # the receiver's block output and gradients, before patching
            base = [self._base_output(stop, bi) for bi in range(n)]
            gradients = [self.linear.gradients(bi)[0][stop] for bi in range(n)]
        outs = []
        for c in group:
            with patched(self.model, scorer.pair.donor, self.space, [c]):
                outs.append([run_blocks(scorer, bi, layer, layer) for bi in range(n)])
        stacked = [torch.cat([o[bi] for o in outs]) for bi in range(n)]
        if stop > layer:
            stacked = [run_blocks(scorer, bi, layer + 1, stop, h, len(group)) for bi, h in enumerate(stacked)]
        if stop == anchor:
            return readout_variants(scorer, stacked, len(group))
        rows = []
        for bi in range(n):
            change = stacked[bi].view(len(group), *base[bi].shape) - base[bi]
            linear = torch.einsum("vbsh,bsh->vb", change.to(scorer.u.dtype), gradients[bi].to(scorer.u.dtype))
            rows.append(self.linear.f_receiver(bi) + linear)
        return torch.cat(rows, dim=1)

    def parts(self, items: list[Component]) -> list[tuple[Strategy, list[Component]]]:
        """Neurons by the batched neuron path, everything else by the weight-slice path."""
        return [
            (self.neurons, [c for c in items if c.kind == "neuron"]),
            (self, [c for c in items if c.kind != "neuron"]),
        ]

    def run(self, components: Iterable[Component | str], progress: bool = True) -> ScoreTable:
        """Score each component; rows come in the order given."""
        return self.score(components, progress=progress)


def local_exact_scores(
    scorer: AnchorScorer,
    kinds: Iterable[Kind] = KINDS,
    components: Iterable[Component | str] | None = None,
    exact_blocks: int = 1,
    progress: bool = True,
) -> ScoreTable:
    """Local-exact scores (method ``"local_exact"``) for every component of ``kinds`` (or the given
    ``components``): each component's own block and the ``exact_blocks - 1`` blocks above it exact,
    the rest up to the anchor linearized at the receiver (neurons: their own block only). Same
    normalization and rows as the exact score."""
    return LocalExactScreen(scorer, exact_blocks).run(scorer.pair.space.select(kinds, components), progress=progress)
