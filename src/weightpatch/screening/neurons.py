"""Exact scores at neuron scale (issue: scale).

Patching MLP neuron ``j`` of layer ``l`` alone changes that MLP's output by

    delta_j(x) = a_j^sft(x) * w_j^sft - a_j^base(x) * w_j^base

where ``a_j`` is the neuron's activation (the input of the down projection, computed from the
patched gate/up rows) and ``w_j`` its output vector (the down projection's column). The MLP input
does not depend on neuron ``j``, so the activations of every neuron under base and under donor
weights come from two MLP runs per prompt batch, for all neurons at once. Each variant is then
"base run of block ``l`` with ``delta_j`` added to the MLP output": many variants are stacked into
one batch that runs blocks ``l..anchor`` together, with no per-neuron weight patching. Any norm
applied after the MLP (Gemma2/3's post-feedforward norm) still runs on the patched output, so the
scores are exact, equal to patching each neuron's weights one by one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from weightpatch.components import Component, ParamSlice
from weightpatch.patch import donor_values, patched
from weightpatch.results import ScoreTable, score_row
from weightpatch.runner import run_segment
from weightpatch.screening.exact import METHOD, ExactScreen


class NeuronScreen:
    """Exact single-neuron scores for whole layers, ``neurons_per_forward`` variants per pass."""

    def __init__(self, screen: ExactScreen, neurons_per_forward: int = 64) -> None:
        self.screen, self.neurons_per_forward = screen, neurons_per_forward
        self.scorer, self.space, self.model = screen.scorer, screen.space, screen.model

    def _paths(self, layer: int) -> tuple[str, str, str, int]:
        """(MLP module, neuron-activation module, its weight name, the weight's neuron dim) of a
        layer, as the architecture declares them (the MLP output and neuron activation sites)."""
        mlp = self.space.site(Component("module", layer, "mlp")).module
        down = self.space.site(Component("neuron", layer, "mlp", 0)).module
        return (mlp, down, *self.space.neuron_readout(layer))

    def _activations(self, layer: int, batch_index: int, down: str, inputs_patch: list[Component]):
        """Inputs of the down projection (batch, seq, neurons) under base weights and with the
        donor's neuron input weights (gate/up rows and their biases) patched in."""
        scorer, space, model = self.scorer, self.space, self.model
        batch = scorer.batches[batch_index]
        hidden_in = self.screen.inputs[batch_index].get(layer) if layer > 0 else None
        captured: list[torch.Tensor] = []
        handle = model.get_submodule(down).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            run_segment(model, space, batch, stop=layer, start=layer, hidden_in=hidden_in)
            with patched(model, scorer.pair.donor, space, inputs_patch):
                run_segment(model, space, batch, stop=layer, start=layer, hidden_in=hidden_in)
        finally:
            handle.remove()
        return captured[0], captured[1]

    def _output_vectors(self, down_weight: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every neuron's output vector (the down projection's slice along its neuron ``dim``),
        (neurons, hidden), under the receiver's and the donor's weights."""
        w = self.model.get_parameter(down_weight)
        w_donor = donor_values(self.scorer.pair.donor, ParamSlice(down_weight), w)
        return w.detach().movedim(dim, 0), w_donor.movedim(dim, 0)

    def _input_components(self, layer: int, down_weight: str) -> list[Component]:
        """The MLP parameters that feed the neurons (everything in the neuron rules but the down
        projection), as module components to patch."""
        names = {s.name for s in self.space.resolve(Component("neuron", layer, "mlp", 0))} - {down_weight}
        return [
            Component("module", layer, m)
            for m in self.space.module_names(layer)
            if m.startswith("mlp.") and {s.name for s in self.space.resolve(Component("module", layer, m))} & names
        ]

    def run_layer(self, layer: int, neurons: Iterable[int] | None = None, progress: bool = True) -> ScoreTable:
        scorer, space, model = self.scorer, self.space, self.model
        anchor = scorer.layer
        index = list(range(space.num_neurons(layer)) if neurons is None else neurons)
        if layer > anchor:
            n = int(scorer.valid.sum())
            return ScoreTable.from_rows(
                score_row(Component("neuron", layer, "mlp", j), METHOD, 0.0, 0.0, n) for j in index
            )
        mlp, down, down_weight, dim = self._paths(layer)
        w_base, w_donor = self._output_vectors(down_weight, dim)
        inputs_patch = self._input_components(layer, down_weight)
        f = torch.zeros(len(index), sum(len(b) for b in scorer.batches), dtype=scorer.u.dtype)
        bar = tqdm(
            total=len(index) * len(scorer.batches), desc=f"neurons L{layer}", unit="neuron", disable=not progress
        )
        offset = 0
        with torch.no_grad():
            for bi, batch in enumerate(scorer.batches):
                a_base, a_donor = self._activations(layer, bi, down, inputs_patch)
                hidden_in = self.screen.inputs[bi].get(layer) if layer > 0 else None
                for start in range(0, len(index), self.neurons_per_forward):
                    chunk = torch.tensor(index[start : start + self.neurons_per_forward])
                    k = len(chunk)
                    # (k, batch, seq, hidden): each variant's change of the MLP output
                    delta = torch.einsum("bsk,kh->kbsh", a_donor[..., chunk], w_donor[chunk]) - torch.einsum(
                        "bsk,kh->kbsh", a_base[..., chunk], w_base[chunk]
                    )
                    delta = delta.reshape(k * len(batch), *delta.shape[2:])

                    def add_delta(_m, _a, out, delta=delta):
                        return out + delta.to(out.dtype)

                    handle = model.get_submodule(mlp).register_forward_hook(add_delta)
                    try:
                        stacked_in = hidden_in.repeat(k, 1, 1) if hidden_in is not None else None
                        out = run_segment(
                            model, space, batch.repeat(k), stop=anchor, start=layer, hidden_in=stacked_in
                        )[0]
                    finally:
                        handle.remove()
                    f[start : start + k, offset : offset + len(batch)] = scorer.project(out).view(k, len(batch))
                    bar.update(k)
                offset += len(batch)
        bar.close()
        rows = []
        for j, f_j in zip(index, f, strict=True):
            e = scorer.effect(f_j)
            rows.append(score_row(Component("neuron", layer, "mlp", j), METHOD, e.mean, e.stderr, e.n_prompts))
        return ScoreTable.from_rows(rows)

    def run(self, layers: Iterable[int] | None = None, progress: bool = True) -> ScoreTable:
        layers = range(self.space.num_layers) if layers is None else layers
        return ScoreTable.concat(self.run_layer(layer, progress=progress) for layer in layers)
