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

When block ``l``'s output is its MLP output plus terms that do not depend on it (a residual add, as
in Llama, Qwen, GPT-2 or parallel-attention blocks; probed once per layer), the patched output of
block ``l`` is the base output plus ``delta_j``: the stacked variants then start at block ``l + 1``
(neurons of the anchor's own block need no block run at all), and block ``l`` runs twice per prompt
batch and layer (base and donor activations) instead of once per neuron. The anchor block computes
the last position only, as in :class:`~weightpatch.screening.exact.ExactScreen`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from weightpatch.components import Component, ParamSlice
from weightpatch.patch import donor_values, patched
from weightpatch.results import ScoreTable, score_row
from weightpatch.runner import run_segment
from weightpatch.screening.exact import METHOD, ExactScreen


@dataclass
class _LayerState:
    """What every variant of one layer shares, per prompt batch: the down projection's inputs
    (batch, seq, neurons) under base and donor input weights, the block's base output (batch, seq,
    hidden), and every neuron's output vector (neurons, hidden) under base and donor weights."""

    layer: int
    a_base: list[torch.Tensor]
    a_donor: list[torch.Tensor]
    out_base: list[torch.Tensor]
    w_base: torch.Tensor
    w_donor: torch.Tensor
    additive: bool  # block output = MLP output + terms independent of it


class NeuronScreen:
    """Exact single-neuron scores for whole layers, ``neurons_per_forward`` variants per pass.
    ``skip_own_block``: start the variants at block ``l + 1`` where block ``l`` adds its MLP
    output to the residual (see the module docstring); off, every variant re-runs block ``l``."""

    def __init__(self, screen: ExactScreen, neurons_per_forward: int = 64, skip_own_block: bool = True) -> None:
        self.screen, self.neurons_per_forward, self.skip_own_block = screen, neurons_per_forward, skip_own_block
        self.scorer, self.space, self.model = screen.scorer, screen.space, screen.model
        self._state: _LayerState | None = None  # the last layer's, reused by its next chunk of neurons

    def _paths(self, layer: int) -> tuple[str, str, str, int]:
        """(MLP module, neuron-activation module, its weight name, the weight's neuron dim) of a
        layer, as the architecture declares them (the MLP output and neuron activation sites)."""
        mlp = self.space.site(Component("module", layer, "mlp")).module
        down = self.space.site(Component("neuron", layer, "mlp", 0)).module
        return (mlp, down, *self.space.neuron_readout(layer))

    def _activations(
        self, layer: int, batch_index: int, down: str, inputs_patch: list[Component]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs of the down projection (batch, seq, neurons) under base weights and with the
        donor's neuron input weights (gate/up rows and their biases) patched in, and the block's
        base output (batch, seq, hidden); seq = 1 (the last position) in the anchor's own block."""
        scorer, space, model = self.scorer, self.space, self.model
        batch = scorer.batches[batch_index]
        hidden_in = self.screen.inputs[batch_index].get(layer) if layer > 0 else None
        last = layer == scorer.layer  # the anchor block: its last position only, as the anchor scores
        captured: list[torch.Tensor] = []
        handle = model.get_submodule(down).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            out = run_segment(model, space, batch, stop=layer, start=layer, hidden_in=hidden_in, last_position=last)[0]
            with patched(model, scorer.pair.donor, space, inputs_patch):
                run_segment(model, space, batch, stop=layer, start=layer, hidden_in=hidden_in, last_position=last)
        finally:
            handle.remove()
        return captured[0], captured[1], out

    def _adds_mlp_output(self, layer: int, mlp: str, out_base: torch.Tensor) -> bool:
        """Whether block ``layer``'s output moves by exactly what is added to its MLP output (up to
        rounding), probed on the first prompt batch with a random shift (batch, seq, hidden) ten
        times the size of the output: a norm after the MLP would squash it."""
        batch = self.scorer.batches[0]
        hidden_in = self.screen.inputs[0].get(layer) if layer > 0 else None
        scale = 10 * float(out_base.abs().max())
        probe = scale * torch.randn(out_base.shape, generator=torch.Generator().manual_seed(0)).to(out_base)

        def shift(_m, _a, out):
            return out + probe

        handle = self.model.get_submodule(mlp).register_forward_hook(shift)
        try:
            last = layer == self.scorer.layer  # as in _activations: out_base is then the last position
            out = run_segment(
                self.model, self.space, batch, stop=layer, start=layer, hidden_in=hidden_in, last_position=last
            )[0]
        finally:
            handle.remove()
        tolerance = 64 * torch.finfo(out.dtype).eps * scale
        return bool(((out - out_base - probe).abs().max() <= tolerance).item())

    def _layer_state(self, layer: int) -> _LayerState:
        """The shared inputs of ``layer``'s variants (computed once per layer, the last one kept)."""
        if self._state is not None and self._state.layer == layer:
            return self._state
        self._state = None
        mlp, down, down_weight, dim = self._paths(layer)
        w_base, w_donor = self._output_vectors(down_weight, dim)
        inputs_patch = self._input_components(layer, down_weight)
        runs = [self._activations(layer, bi, down, inputs_patch) for bi in range(len(self.scorer.batches))]
        a_base, a_donor, out_base = (list(x) for x in zip(*runs, strict=True))
        additive = self.skip_own_block and self._adds_mlp_output(layer, mlp, out_base[0])
        self._state = _LayerState(layer, a_base, a_donor, out_base, w_base, w_donor, additive)
        return self._state

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

    def _delta(self, state: _LayerState, batch_index: int, chunk: torch.Tensor, last: bool) -> torch.Tensor:
        """Each variant's change of the MLP output, (k, batch, seq, hidden) for the ``k`` neurons of
        ``chunk`` (``last``: the last position only, seq = 1)."""
        positions = slice(-1, None) if last else slice(None)
        a_base = state.a_base[batch_index][:, positions, chunk]
        a_donor = state.a_donor[batch_index][:, positions, chunk]
        delta = torch.einsum("bsk,kh->kbsh", a_donor, state.w_donor[chunk])
        return delta.sub_(torch.einsum("bsk,kh->kbsh", a_base, state.w_base[chunk]))

    def _chunk_output(self, state: _LayerState, batch_index: int, chunk: torch.Tensor) -> torch.Tensor:
        """The anchor block's output (k * batch, seq, hidden; seq may be cut to the last position)
        of each neuron of ``chunk`` patched alone, variant-major."""
        model, space, anchor, layer = self.model, self.space, self.scorer.layer, state.layer
        batch = self.scorer.batches[batch_index]
        k = len(chunk)
        if state.additive:
            # block `layer` patched = its base output + delta: nothing to re-run in it
            out_base = state.out_base[batch_index]
            if layer == anchor:
                return (out_base[:, -1:] + self._delta(state, batch_index, chunk, last=True)).flatten(0, 1)
            stacked = (out_base + self._delta(state, batch_index, chunk, last=False)).flatten(0, 1)
            return run_segment(
                model, space, batch.repeat(k), stop=anchor, start=layer + 1, hidden_in=stacked, last_position=True
            )[0]
        delta = self._delta(state, batch_index, chunk, last=False).flatten(0, 1)

        def add_delta(_m, _a, out):
            return out + delta.to(out.dtype)

        hidden_in = self.screen.inputs[batch_index].get(layer) if layer > 0 else None
        handle = model.get_submodule(self._paths(layer)[0]).register_forward_hook(add_delta)
        try:
            stacked_in = hidden_in.repeat(k, 1, 1) if hidden_in is not None else None
            return run_segment(
                model, space, batch.repeat(k), stop=anchor, start=layer, hidden_in=stacked_in, last_position=True
            )[0]
        finally:
            handle.remove()

    def run_layer(self, layer: int, neurons: Iterable[int] | None = None, progress: bool = True) -> ScoreTable:
        """Exact scores of the ``neurons`` of ``layer`` (default: all), one row each, in order."""
        scorer, space = self.scorer, self.space
        index = list(range(space.num_neurons(layer)) if neurons is None else neurons)
        if layer > scorer.layer:
            n = int(scorer.valid.sum())
            return ScoreTable.from_rows(
                score_row(Component("neuron", layer, "mlp", j), METHOD, 0.0, 0.0, n) for j in index
            )
        f = torch.zeros(len(index), sum(len(b) for b in scorer.batches), dtype=scorer.u.dtype)
        bar = tqdm(
            total=len(index) * len(scorer.batches), desc=f"neurons L{layer}", unit="neuron", disable=not progress
        )
        offset = 0
        with torch.no_grad():
            state = self._layer_state(layer)
            for bi, batch in enumerate(scorer.batches):
                for start in range(0, len(index), self.neurons_per_forward):
                    chunk = torch.tensor(index[start : start + self.neurons_per_forward])
                    out = self._chunk_output(state, bi, chunk)
                    f[start : start + len(chunk), offset : offset + len(batch)] = scorer.project(out).view(
                        len(chunk), len(batch)
                    )
                    bar.update(len(chunk))
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
