"""The Weight Patching operator (docs/method.md, "The operator").

    M_recv^(C <- donor) := Replace(M_recv, M_donor; union of Θ(c) for c in C)

:func:`patched` applies it in place as a context manager and restores the receiver bit-exactly on
exit, also when the body raises. With ``alpha`` it interpolates:
``theta_recv + alpha * (theta_donor - theta_recv)`` on the patched slices (``alpha = 1`` copies the
donor's values exactly; ``alpha = 0`` is a no-op). The direction is set by which model is the
receiver (see :class:`weightpatch.pair.ModelPair`): base receiver = repair, specialized receiver =
knockout.

Memory: the originals of the patched slices only (a head or neuron patch saves a few rows).
Modules offloaded to the CPU by accelerate are patched in their hook's weights map; disk offload is
refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from weightpatch.components import Component, ComponentSpace, ParamSlice
from weightpatch.errors import WeightPatchError
from weightpatch.weights import WeightSource


@dataclass
class _Saved:
    param: torch.Tensor
    piece: ParamSlice
    index: torch.Tensor | None
    original: torch.Tensor


def _offload_hooks(module: torch.nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return [h for h in getattr(hook, "hooks", [hook]) if getattr(h, "weights_map", None) is not None]


def parameter_storage(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The tensor that holds a parameter's values: the parameter itself, or, for a module offloaded
    by accelerate (the parameter sits on the ``meta`` device between forwards), the CPU tensor in its
    hook's weights map, which the hook copies in at every forward."""
    param = model.get_parameter(name)
    if param.device.type != "meta":
        return param
    module_name, _, local = name.rpartition(".")
    for hook in _offload_hooks(model.get_submodule(module_name)):
        value = hook.weights_map[local]
        if value.device.type != "meta" and hook.weights_map[local].data_ptr() == value.data_ptr():
            return value
    raise WeightPatchError(
        f"{name} is offloaded to disk (or not loaded): weights cannot be patched there; load the model "
        f"without disk offload (device_map over devices, or CPU offload) or with more memory"
    )


def _get(param: torch.Tensor, piece: ParamSlice, index: torch.Tensor | None) -> torch.Tensor:
    return param.data if index is None else piece.region(param.data).index_select(piece.dim, index)  # type: ignore[arg-type]


def _put(param: torch.Tensor, piece: ParamSlice, index: torch.Tensor | None, values: torch.Tensor) -> None:
    if index is None:
        param.data.copy_(values)
    else:
        piece.region(param.data).index_copy_(piece.dim, index, values)  # type: ignore[arg-type]


def donor_values(donor: WeightSource, piece: ParamSlice, like: torch.Tensor) -> torch.Tensor:
    """The donor's values for a slice, on the receiver parameter's device and dtype."""
    return donor.read(piece).to(device=like.device, dtype=like.dtype)


class Patch:
    """What a :func:`patched` block yields: the patched slices and the receiver's original values."""

    def __init__(self, saved: list[_Saved]) -> None:
        self._saved = saved

    @property
    def slices(self) -> list[ParamSlice]:
        return [s.piece for s in self._saved]

    def original(self, name: str) -> torch.Tensor:
        """The receiver's original value of a fully patched parameter."""
        for s in self._saved:
            if s.piece.name == name and s.piece.is_full:
                return s.original
        raise KeyError(f"{name} is not fully patched in this block")


@contextmanager
def patched(
    model: torch.nn.Module,
    donor: WeightSource,
    space: ComponentSpace,
    components: Iterable[Component | str],
    alpha: float = 1.0,
) -> Iterator[Patch]:
    """Patch ``components`` from ``donor`` into ``model`` for the duration of the block.

    Overlapping components (``L5`` and ``L5.mlp``) are patched once (the union of their slices).
    """
    with _patched_pieces(model, donor, space.resolve_all(components), alpha) as patch:
        yield patch


@contextmanager
def _patched_pieces(
    model: torch.nn.Module, donor: WeightSource, pieces: Iterable[ParamSlice], alpha: float = 1.0
) -> Iterator[Patch]:
    saved: list[_Saved] = []
    try:
        with torch.no_grad():
            for piece in pieces:
                param = parameter_storage(model, piece.name)
                index = None if piece.is_full else piece.index().to(param.device)
                original = _get(param, piece, index).clone()
                saved.append(_Saved(param, piece, index, original))
                new = donor_values(donor, piece, param)
                if alpha != 1.0:
                    new = original + alpha * (new - original)
                _put(param, piece, index, new)
        yield Patch(saved)
    finally:
        with torch.no_grad():
            for s in reversed(saved):
                _put(s.param, s.piece, s.index, s.original)


@contextmanager
def patched_while_running(
    model: torch.nn.Module, donor: WeightSource, space: ComponentSpace, components: Iterable[Component | str]
) -> Iterator[torch.nn.Module]:
    """The forwards of :func:`patched` (``alpha = 1``) with each slice patched only while the module
    that uses it runs: a decoder block's slices while the block runs, a model-level parameter's (the
    embedding, the final norm, the unembedding) while each module that holds it runs (a tied
    embedding: the input embedding and the unembedding). The weights every operation sees are the
    same as with everything patched at once, so the outputs are bit for bit the same; the memory
    added is one block's originals and donor values instead of a copy of every patched slice.

    For forwards without gradients (a backward would find the weights changed since the forward).
    A parameter that a module reads outside its own forward would not be patched; the families in
    :mod:`weightpatch.architecture` read every weight in the forward of a module that holds it
    (checked in tests/test_patch.py against :func:`patched`)."""
    layers: torch.nn.ModuleList = model.get_submodule(space.layers_path)  # type: ignore[assignment]
    prefixes = [space.spec.param_name(i, "") for i in range(len(layers))]
    groups: dict[int, tuple[torch.nn.Module, list[ParamSlice]]] = {}

    def add(module: torch.nn.Module, piece: ParamSlice) -> None:
        groups.setdefault(id(module), (module, []))[1].append(piece)

    holders: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append(module)
    for piece in space.resolve_all(components):
        layer = next((i for i, pre in enumerate(prefixes) if piece.name.startswith(pre)), None)
        if layer is not None:
            add(layers[layer], piece)
            continue
        for module in holders.get(id(model.get_parameter(piece.name)), []):
            add(module, piece)
    open_patches: dict[int, ExitStack] = {}
    handles = []

    def enter(key: int, pieces: list[ParamSlice]):
        def hook(_module, _args):
            if key in open_patches:
                open_patches.pop(key).close()
            stack = ExitStack()
            stack.enter_context(_patched_pieces(model, donor, pieces))
            open_patches[key] = stack

        return hook

    def leave(key: int):
        def hook(_module, _args, _output):
            if key in open_patches:
                open_patches.pop(key).close()

        return hook

    try:
        for key, (module, pieces) in groups.items():
            handles.append(module.register_forward_pre_hook(enter(key, pieces)))
            handles.append(module.register_forward_hook(leave(key), always_call=True))
        yield model
    finally:
        for h in handles:
            h.remove()
        for stack in open_patches.values():
            stack.close()
        open_patches.clear()
