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
from contextlib import contextmanager
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
    pieces = space.resolve_all(components)
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
