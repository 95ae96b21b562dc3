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

from collections import defaultdict
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from weightpatch.components import KINDS, Component, Kind
from weightpatch.errors import WeightPatchError
from weightpatch.patch import patched
from weightpatch.results import ScoreTable, score_row
from weightpatch.runner import Batch, _first_tensor, decoder_layers, run_segment
from weightpatch.scoring import AnchorScorer
from weightpatch.screening.exact import ExactScreen
from weightpatch.screening.first_order import _targets
from weightpatch.screening.neurons import NeuronScreen

METHOD = "local_exact"


def residual_gradients(
    scorer: AnchorScorer, batch: Batch, mlp_paths: dict[int, str]
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
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
            store[layer] = _first_tensor(output)

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


class LocalExactScreen:
    """Local-exact scores on one scorer's prompts and anchor (see the module docstring)."""

    def __init__(
        self,
        scorer: AnchorScorer,
        exact_blocks: int = 1,
        screen: ExactScreen | None = None,
        variants_per_batch: int = 8,
    ) -> None:
        if exact_blocks < 1:
            raise WeightPatchError(f"exact_blocks must be at least 1 (the component's own block), got {exact_blocks}")
        self.scorer, self.exact_blocks, self.variants_per_batch = scorer, exact_blocks, variants_per_batch
        self.screen = screen or ExactScreen(scorer)
        self.neurons = NeuronScreen(self.screen)
        self.model, self.space = scorer.pair.model, scorer.pair.space
        self._gradients: list[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]] | None = None
        self._base_outputs: dict[tuple[int, int], torch.Tensor] = {}
        offsets = [0]
        for b in scorer.batches:
            offsets.append(offsets[-1] + len(b))
        self._offsets = offsets

    def _block_output(self, layer: int, batch_index: int) -> torch.Tensor:
        """Output of block ``layer`` (from the embedding for ``layer = 0``) on the cached receiver
        input, with the model's current weights."""
        hidden_in = self.screen.inputs[batch_index].get(layer) if layer > 0 else None
        batch = self.scorer.batches[batch_index]
        last = layer == self.scorer.layer  # the anchor block: its last position, as the anchor scores
        return run_segment(
            self.model, self.space, batch, stop=layer, start=layer, hidden_in=hidden_in, last_position=last
        )[0]

    def _base_output(self, layer: int, batch_index: int) -> torch.Tensor:
        """:meth:`_block_output` of the receiver, cached (call it outside any patch)."""
        key = (layer, batch_index)
        if key not in self._base_outputs:
            self._base_outputs[key] = self._block_output(layer, batch_index)
        return self._base_outputs[key]

    def gradients(self, batch_index: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """(residual gradients by layer, MLP-output gradients by layer) of one prompt batch."""
        if self._gradients is None:
            mlps = {layer: self.neurons._paths(layer)[0] for layer in range(self.scorer.layer)}
            self._gradients = [residual_gradients(self.scorer, b, mlps) for b in self.scorer.batches]
        return self._gradients[batch_index]

    def _group_scores(self, group: list[Component], layer: int) -> torch.Tensor:
        """Estimated patched anchor scores (variant, prompt) of components first affecting ``layer``:
        block ``layer`` runs with each component patched alone, then (stacked) the receiver's blocks
        up to ``stop = min(layer + exact_blocks - 1, anchor)``; the change of the residual stream
        after ``stop`` is carried to the anchor with the gradient there (exact when ``stop`` is the
        anchor)."""
        scorer, anchor, n = self.scorer, self.scorer.layer, len(self.scorer.batches)
        stop = min(layer + self.exact_blocks - 1, anchor)
        if stop < anchor:  # the receiver's block output and gradients, before patching
            base = [self._base_output(stop, bi) for bi in range(n)]
            gradients = [self.gradients(bi)[0][stop] for bi in range(n)]
        outs = []
        for c in group:
            with patched(self.model, scorer.pair.donor, self.space, [c]):
                outs.append([self._block_output(layer, bi) for bi in range(n)])
        rows = []
        for bi, batch in enumerate(scorer.batches):
            stacked = torch.cat([o[bi] for o in outs])
            if stop > layer:
                stacked = run_segment(
                    self.model,
                    self.space,
                    batch.repeat(len(group)),
                    stop=stop,
                    start=layer + 1,
                    hidden_in=stacked,
                    last_position=stop == anchor,
                )[0]
            if stop == anchor:
                rows.append(scorer.project(stacked).view(len(group), len(batch)))
                continue
            f_receiver = scorer.f_receiver[self._offsets[bi] : self._offsets[bi + 1]]
            change = stacked.view(len(group), *base[bi].shape) - base[bi]
            linear = torch.einsum("vbsh,bsh->vb", change.to(scorer.u.dtype), gradients[bi].to(scorer.u.dtype))
            rows.append(f_receiver + linear)
        return torch.cat(rows, dim=1)

    def _neuron_layer(self, layer: int, index: list[int]) -> list[dict]:
        """Rows for the neurons ``index`` of ``layer`` (below the anchor) by the batched neuron path."""
        scorer, ns = self.scorer, self.neurons
        _mlp, down, down_weight, dim = ns._paths(layer)
        w_base, w_donor = ns._output_vectors(down_weight, dim)
        inputs_patch = ns._input_components(layer, down_weight)
        chunk = torch.tensor(index)
        dtype = scorer.u.dtype
        w_base, w_donor = w_base[chunk].to(dtype), w_donor[chunk].to(dtype)
        f = []
        for bi in range(len(scorer.batches)):
            a_base, a_donor, _ = ns._activations(layer, bi, down, inputs_patch)
            g = self.gradients(bi)[1][layer].to(dtype)  # (batch, seq, hidden)
            change = torch.einsum("bsk,bsk->bk", a_donor[..., chunk].to(dtype), g @ w_donor.T) - torch.einsum(
                "bsk,bsk->bk", a_base[..., chunk].to(dtype), g @ w_base.T
            )
            f_receiver = scorer.f_receiver[self._offsets[bi] : self._offsets[bi + 1]]
            f.append(f_receiver[:, None] + change)
        rows = []
        for j, f_j in zip(index, torch.cat(f).T, strict=True):
            e = scorer.effect(f_j)
            rows.append(score_row(Component("neuron", layer, "mlp", j), METHOD, e.mean, e.stderr, e.n_prompts))
        return rows

    def run(self, components: Iterable[Component | str], progress: bool = True) -> ScoreTable:
        """Score each component; rows come in the order given."""
        scorer, anchor = self.scorer, self.scorer.layer
        todo = [self.space.validate(c) for c in components]
        n_valid = int(scorer.valid.sum())
        rows: dict[str, dict] = {}
        neurons: dict[int, list[int]] = defaultdict(list)
        bar = tqdm(total=len(todo), desc=METHOD, unit="comp", disable=not progress)
        with torch.no_grad():
            for c in todo:
                if c.kind == "neuron" and c.layer <= anchor:  # type: ignore[operator]
                    neurons[c.layer].append(c.index)  # type: ignore[index,arg-type]
            for layer, index in neurons.items():
                if layer < anchor:
                    layer_rows = self._neuron_layer(layer, index)
                else:  # the anchor's own block: exact
                    exact = self.neurons.run_layer(layer, index, progress=False).frame.to_dict("records")
                    layer_rows = [{**row, "method": METHOD} for row in exact]
                rows.update((row["component"], row) for row in layer_rows)
                bar.update(len(index))
            by_layer: dict[int, list[Component]] = defaultdict(list)
            for c in dict.fromkeys(c for c in todo if c.name not in rows):
                by_layer[self.space.first_affected_layer(c)].append(c)
            for layer, same_layer in sorted(by_layer.items()):
                for i in range(0, len(same_layer), self.variants_per_batch):
                    group = same_layer[i : i + self.variants_per_batch]
                    if layer > anchor:
                        rows.update((c.name, score_row(c, METHOD, 0.0, 0.0, n_valid)) for c in group)
                    else:
                        for c, f_c in zip(group, self._group_scores(group, layer), strict=True):
                            e = scorer.effect(f_c)
                            rows[c.name] = score_row(c, METHOD, e.mean, e.stderr, e.n_prompts)
                    bar.update(len(group))
        bar.close()
        return ScoreTable.from_rows(rows[c.name] for c in todo)


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
    return LocalExactScreen(scorer, exact_blocks).run(_targets(scorer, kinds, components), progress=progress)
