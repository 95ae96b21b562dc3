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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from weightpatch.components import Component, ParamSlice
from weightpatch.engine import EffectStrategy, readout_variants, run_blocks
from weightpatch.patch import donor_values, patched
from weightpatch.results import ScoreTable
from weightpatch.scoring import GapScorer
from weightpatch.screening.exact import METHOD, ExactScreen


@dataclass
class NeuronLayer:
    """What every neuron variant of one layer shares, per prompt batch: the down projection's inputs
    (batch, seq, neurons) under base and donor input weights, the block's base output (batch, seq,
    hidden), and every neuron's output vector (neurons, hidden) under base and donor weights; seq = 1
    (the last position) in the anchor's own block."""

    layer: int
    mlp: str  # the MLP module's path (its output is where a neuron's change lands)
    a_base: list[torch.Tensor]
    a_donor: list[torch.Tensor]
    out_base: list[torch.Tensor]
    w_base: torch.Tensor
    w_donor: torch.Tensor
    additive: bool  # block output = MLP output + terms independent of it


class NeuronScreen(EffectStrategy[Component]):
    """Exact single-neuron scores, ``neurons_per_forward`` variants per pass: the neuron strategy of
    the sweep. ``skip_own_block``: start the variants at block ``l + 1`` where block ``l`` adds its
    MLP output to the residual (see the module docstring); off, every variant re-runs block ``l``.
    ``scorer``: the objective (an :class:`AnchorScorer` or a behaviour scorer, or an
    :class:`ExactScreen` on it)."""

    method = METHOD

    def __init__(
        self, scorer: GapScorer | ExactScreen, neurons_per_forward: int = 64, skip_own_block: bool = True
    ) -> None:
        scorer = scorer.scorer if isinstance(scorer, ExactScreen) else scorer
        super().__init__(scorer)
        self.scorer, self.neurons_per_forward, self.skip_own_block = scorer, neurons_per_forward, skip_own_block
        self._state: NeuronLayer | None = None  # the last layer's, reused by its next group of neurons

    @property
    def variants_per_batch(self) -> int:  # type: ignore[override]
        return self.neurons_per_forward

    def _activations(
        self, layer: int, batch_index: int, down: str, inputs_patch: list[Component]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs of the down projection (batch, seq, neurons) under base weights and with the
        donor's neuron input weights (gate/up rows and their biases) patched in, and the block's
        base output (batch, seq, hidden), all from block ``layer`` alone."""
        captured: list[torch.Tensor] = []
        handle = self.model.get_submodule(down).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            out = run_blocks(self.scorer, batch_index, layer, layer)
            with patched(self.model, self.scorer.pair.donor, self.space, inputs_patch):
                run_blocks(self.scorer, batch_index, layer, layer)
        finally:
            handle.remove()
        return captured[0], captured[1], out

    def _adds_mlp_output(self, layer: int, mlp: str, out_base: torch.Tensor) -> bool:
        """Whether block ``layer``'s output moves by exactly what is added to its MLP output (up to
        rounding), probed on the first prompt batch with a random shift (batch, seq, hidden) ten
        times the size of the output: a norm after the MLP would squash it."""
        scale = 10 * float(out_base.abs().max())
        probe = scale * torch.randn(out_base.shape, generator=torch.Generator().manual_seed(0)).to(out_base)

        def shift(_m, _a, out):
            return out + probe

        handle = self.model.get_submodule(mlp).register_forward_hook(shift)
        try:
            out = run_blocks(self.scorer, 0, layer, layer)  # as in _activations (the anchor block: last position)
        finally:
            handle.remove()
        tolerance = 64 * torch.finfo(out.dtype).eps * scale
        return bool(((out - out_base - probe).abs().max() <= tolerance).item())

    def layer_state(self, layer: int) -> NeuronLayer:
        """The shared inputs of ``layer``'s variants (computed once per layer, the last one kept)."""
        if self._state is not None and self._state.layer == layer:
            return self._state
        self._state = None
        space = self.space
        mlp = space.site(Component("module", layer, "mlp")).module
        down = space.site(Component("neuron", layer, "mlp", 0)).module
        down_weight, dim = space.neuron_readout(layer)
        w = self.model.get_parameter(down_weight)
        w_donor = donor_values(self.scorer.pair.donor, ParamSlice(down_weight), w)
        inputs_patch = self._input_components(layer, down_weight)
        runs = [self._activations(layer, bi, down, inputs_patch) for bi in range(len(self.scorer.batches))]
        a_base, a_donor, out_base = (list(x) for x in zip(*runs, strict=True))
        additive = self.skip_own_block and self._adds_mlp_output(layer, mlp, out_base[0])
        w_base = w.detach().movedim(dim, 0)
        self._state = NeuronLayer(layer, mlp, a_base, a_donor, out_base, w_base, w_donor.movedim(dim, 0), additive)
        return self._state

    def _input_components(self, layer: int, down_weight: str) -> list[Component]:
        """The MLP parameters that feed the neurons (everything in the neuron rules but the down
        projection), as module components to patch."""
        names = {s.name for s in self.space.resolve(Component("neuron", layer, "mlp", 0))} - {down_weight}
        return [
            Component("module", layer, m)
            for m in self.space.module_names(layer)
            if m.startswith("mlp.") and {s.name for s in self.space.resolve(Component("module", layer, m))} & names
        ]

    @staticmethod
    def _delta(state: NeuronLayer, batch_index: int, chunk: torch.Tensor, last: bool) -> torch.Tensor:
        """Each variant's change of the MLP output, (k, batch, seq, hidden) for the ``k`` neurons of
        ``chunk`` (``last``: the last position only, seq = 1)."""
        positions = slice(-1, None) if last else slice(None)
        a_base = state.a_base[batch_index][:, positions, chunk]
        a_donor = state.a_donor[batch_index][:, positions, chunk]
        delta = torch.einsum("bsk,kh->kbsh", a_donor, state.w_donor[chunk])
        return delta.sub_(torch.einsum("bsk,kh->kbsh", a_base, state.w_base[chunk]))

    def _chunk_output(self, state: NeuronLayer, batch_index: int, chunk: torch.Tensor) -> torch.Tensor:
        """The stop block's output (k * batch, seq, hidden; seq may be cut to the last position)
        of each neuron of ``chunk`` patched alone, variant-major."""
        stop, layer, k = self.scorer.stop, state.layer, len(chunk)
        if state.additive:
            # block `layer` patched = its base output + delta: nothing to re-run in it
            out_base = state.out_base[batch_index]
            if layer == stop:
                last = self.scorer.last_position
                delta = self._delta(state, batch_index, chunk, last=last)
                return ((out_base[:, -1:] if last else out_base) + delta).flatten(0, 1)
            stacked = (out_base + self._delta(state, batch_index, chunk, last=False)).flatten(0, 1)
            return run_blocks(self.scorer, batch_index, layer + 1, hidden=stacked, variants=k)
        delta = self._delta(state, batch_index, chunk, last=False).flatten(0, 1)

        def add_delta(_m, _a, out):
            return out + delta.to(out.dtype)

        handle = self.model.get_submodule(state.mlp).register_forward_hook(add_delta)
        try:
            return run_blocks(self.scorer, batch_index, layer, variants=k)
        finally:
            handle.remove()

    def values(self, group: Sequence[Component], layer: int) -> torch.Tensor:
        state = self.layer_state(layer)
        chunk = torch.tensor([c.index for c in group])
        outs = [self._chunk_output(state, bi, chunk) for bi in range(len(self.scorer.batches))]
        return readout_variants(self.scorer, outs, len(group))

    def run_layer(self, layer: int, neurons: Iterable[int] | None = None, progress: bool = True) -> ScoreTable:
        """Exact scores of the ``neurons`` of ``layer`` (default: all), one row each, in order."""
        index = range(self.space.num_neurons(layer)) if neurons is None else neurons
        return self.score([Component("neuron", layer, "mlp", j) for j in index], progress=progress)

    def run(self, layers: Iterable[int] | None = None, progress: bool = True) -> ScoreTable:
        """Every neuron of ``layers`` (default: every layer)."""
        layers = range(self.space.num_layers) if layers is None else layers
        neurons = [
            Component("neuron", layer, "mlp", j) for layer in layers for j in range(self.space.num_neurons(layer))
        ]
        return self.score(neurons, progress=progress)
