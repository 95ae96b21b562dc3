"""What a stage will cost before it runs: predicted peak memory and duration from the model's shapes
(its config only: the model is instantiated on the ``meta`` device, no weight is read), the prompts'
token counts, the components, and two short measurements of this machine.

Memory (bytes) is the process's resident memory now (Python, torch, transformers) plus what the stage
holds at its peak, in units of the model's size ``M`` (parameters x bytes of the dtype):

============  ==========================================================================
load          ``M``: the receiver (the donor is read lazily, one tensor or slice at a time;
              ``.bin``/GGUF donors are loaded whole: ``2 M``)
check         ``M`` + one donor tensor + float64 row chunks of the difference
anchor        ``M`` + the largest tensor or block: the model-difference / specialized forwards
              patch each block (and the embedding) only while it runs, keeping its originals
              (1.2B pair: 1.13-1.47 M measured, the embedding the largest tensor; ``2 M`` when every
              weight was patched in at once)
screen/trace  the same for the scorer's donor forward, or ``M`` + the gradient graph to the
              anchor + float64 copies of the largest target tensor
merge         one output shard (the whole model below 5 GB) + float32 copies of the largest
              tensor per expert (streamed)
============  ==========================================================================

Duration (seconds) counts matrix-multiply FLOPs (``2 x parameters`` per token and block, plus the
unembedding per scored position) divided by the rate of one ``F.linear`` of the model's own MLP shape
in its dtype on this machine (:func:`measure_rates`, ~0.1-1 s; bfloat16 on a CPU without native
support is several times slower than float32, which this captures), and elementwise passes over
weights (reading, patching, float64 reductions) divided by a measured element rate.

The exact sweep's own calibration (:mod:`weightpatch.backends.estimate`) refines its duration once
its first shards have run; this module's figure is the one printed before anything is loaded.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

_LAYER = re.compile(r"\.layers?\.(\d+)\.|\.h\.(\d+)\.|\.blocks?\.(\d+)\.")
GiB = 2**30
MERGE_SHARD_BYTES = 5 * 10**9  # merging.stream.merge_checkpoints' default max_shard_size ("5GB")


@dataclass(frozen=True)
class ModelShape:
    """Sizes that set a stage's cost, read from a config: parameter counts (elements) and the dtype."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    block_params: int  # mean parameters of one decoder block
    embed_params: int  # input embedding (also the unembedding when tied)
    unembed_params: int  # untied output matrix (0 when tied)
    params: int  # every parameter
    largest_tensor: int  # elements of the largest parameter
    largest_block_tensor: int  # elements of the largest parameter inside a block
    dtype_bytes: int
    stored_bytes: int = 0  # bytes per parameter in the checkpoint (0: as ``dtype_bytes``)

    @property
    def model_bytes(self) -> int:
        """Bytes of the weights in memory: ``params x dtype_bytes``."""
        return self.params * self.dtype_bytes

    @property
    def load_bytes(self) -> int:
        """Peak bytes of loading: the model, plus the checkpoint's memory-mapped pages when it is stored in
        another dtype (they stay resident while every tensor is converted)."""
        stored = self.stored_bytes or self.dtype_bytes
        return self.model_bytes + (self.params * stored if stored != self.dtype_bytes else 0)

    def block_flops(self, tokens: int) -> float:
        """Matrix-multiply FLOPs of one block over ``tokens`` tokens (2 per parameter and token)."""
        return 2.0 * self.block_params * tokens

    def unembed_flops(self, positions: int) -> float:
        """FLOPs of the unembedding on ``positions`` positions."""
        return 2.0 * self.vocab * self.hidden * positions


def _dtype_bytes(dtype: str | torch.dtype | None, config) -> int:
    """Bytes per parameter of ``dtype`` (``auto``/None: the config's stored dtype, else float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    if dtype in (None, "auto"):
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
        dtype = str(stored).removeprefix("torch.")
    return {"float64": 8, "float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}.get(str(dtype), 4)


def shape_of_config(config, dtype: str | torch.dtype | None = "float32") -> ModelShape:
    """The :class:`ModelShape` of a transformers config, counted on a ``meta``-device instance."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    per_layer: dict[int, int] = {}
    largest_block = 0
    for name, p in model.named_parameters():
        found = _LAYER.search(name)
        if found:
            layer = int(next(g for g in found.groups() if g is not None))
            per_layer[layer] = per_layer.get(layer, 0) + p.numel()
            largest_block = max(largest_block, p.numel())
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    untied = out is not None and out.weight is not embed
    params = sum(p.numel() for p in model.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", embed.shape[1]))
    return ModelShape(
        layers=len(per_layer),
        hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", 4 * hidden) or 4 * hidden),
        vocab=int(embed.shape[0]),
        block_params=sum(per_layer.values()) // max(len(per_layer), 1),
        embed_params=embed.numel(),
        unembed_params=out.weight.numel() if untied else 0,
        params=params,
        largest_tensor=max(p.numel() for p in model.parameters()),
        largest_block_tensor=largest_block,
        dtype_bytes=_dtype_bytes(dtype, config),
        stored_bytes=_dtype_bytes("auto", config),
    )


def model_shape(
    source: str | os.PathLike, dtype: str | torch.dtype | None = "float32", trust_remote_code: bool = False
) -> ModelShape:
    """The :class:`ModelShape` of a local model directory (or a PEFT adapter's base model)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(source).expanduser(), trust_remote_code=trust_remote_code)
    return shape_of_config(config, dtype)


@dataclass(frozen=True)
class Rates:
    """This machine's speed: ``flops`` per second of the model's matrix products in its dtype,
    ``elements`` per second of an elementwise float64 pass over weights (read, subtract, reduce), and
    ``copy`` bytes per second into new memory (loading a checkpoint)."""

    flops: float
    elements: float
    copy: float

    @staticmethod
    def measure_copy(tensor: torch.Tensor | None = None) -> float:
        """Bytes per second of one copy of ``tensor`` (default: 4M bfloat16 elements) into new memory."""
        tensor = torch.randn(2**22).to(torch.bfloat16) if tensor is None else tensor
        start = time.perf_counter()
        tensor.clone()
        return tensor.numel() * tensor.element_size() / max(time.perf_counter() - start, 1e-9)


def measure_rates(shape: ModelShape, dtype: torch.dtype, device: str = "cpu", tokens: int = 64) -> Rates:
    """Time one ``F.linear`` of ``tokens`` rows through a (intermediate x hidden) matrix in ``dtype``
    (best of 2 after a warm-up), one float64 difference-and-square pass over 4M elements, and one copy
    of 4M elements."""
    w = torch.randn(shape.intermediate, shape.hidden, device=device).to(dtype)
    x = torch.randn(tokens, shape.hidden, device=device).to(dtype)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    flops = 2.0 * tokens * shape.hidden * shape.intermediate / max(best, 1e-9)
    a, b = torch.randn(2**22).to(dtype), torch.randn(2**22).to(dtype)
    start = time.perf_counter()
    float((a.double() - b.double()).square().sum())
    elements = 2**22 / max(time.perf_counter() - start, 1e-9)
    return Rates(flops, elements, Rates.measure_copy(a))


@dataclass(frozen=True)
class Workload:
    """What a stage runs, known before loading: prompt token counts, batching, the anchor layer, and
    (screens) the components by kind with the blocks each re-runs up to the anchor."""

    tokens: tuple[int, ...]  # per prompt
    batch_size: int = 16
    anchor_layer: int | None = None  # None: the last layer
    heads: int = 0  # components scored per kind (screens), at or below the anchor
    blocks: int = 0  # attention/MLP/layer modules and other whole-weight components
    neurons: int = 0
    neuron_layers: int = 0  # layers whose neurons are scored
    exact_depth: int = 0  # exact scoring: sum over components of the blocks re-run (anchor - layer + 1)
    curve_points: int = 0  # patched forwards of sufficiency/necessity curves
    generated_tokens: int = 0  # steering: tokens generated in all (prompts x new tokens x runs)
    experts: int = 0  # merge


@dataclass(frozen=True)
class Prediction:
    """A stage's predicted ``peak_bytes`` (resident, the process's current memory included) and
    ``seconds`` (the model's loading included when ``loads``)."""

    stage: str
    peak_bytes: float
    seconds: float
    new_bytes: float  # what the stage adds to the process's current memory
    load_seconds: float = 0.0  # of ``seconds``: loading the model

    def message(self, available: float) -> str:
        """``first_order: predicted peak 5.1 GB (2.4 GB more than now; 18.0 GB available), about 3 min 10 s``."""
        from weightpatch.backends.estimate import format_duration

        return (
            f"{self.stage}: predicted peak {self.peak_bytes / GiB:.1f} GB ({self.new_bytes / GiB:.1f} GB more than "
            f"now; {available / GiB:.1f} GB available), about {format_duration(self.seconds)}"
        )


def _batches(tokens: tuple[int, ...], size: int) -> list[tuple[int, int]]:
    """(prompts, padded length) of each batch."""
    return [(len(tokens[i : i + size]), max(tokens[i : i + size])) for i in range(0, len(tokens), max(size, 1))]


class _Model:
    """Time and activation sizes of forward passes of one shape at measured rates."""

    def __init__(self, shape: ModelShape, rates: Rates, work: Workload) -> None:
        self.shape, self.rates, self.work = shape, rates, work
        self.batches = _batches(work.tokens, work.batch_size) if work.tokens else [(1, 1)]
        self.tokens = sum(n * length for n, length in self.batches)  # padded
        self.anchor = shape.layers - 1 if work.anchor_layer is None else work.anchor_layer

    def blocks(self, count: float) -> float:
        """Seconds of ``count`` block runs over every prompt."""
        return count * self.shape.block_flops(self.tokens) / self.rates.flops

    def forward(self, unembed: bool = True) -> float:
        """Seconds of a forward over every prompt: to the anchor, or (``unembed``) the whole model with logits."""
        if not unembed:
            return self.blocks(self.anchor + 1)
        return self.blocks(self.shape.layers) + self.shape.unembed_flops(self.tokens) / self.rates.flops

    def weights(self, elements: float) -> float:
        """Seconds of an elementwise pass over ``elements`` weights."""
        return elements / self.rates.elements

    def activations(self, layers: int, grad: bool = False) -> float:
        """Bytes of one batch's activations through ``layers`` blocks (kept for the backward with ``grad``,
        else two blocks' worth), logits of the widest batch not included."""
        n, length = max(self.batches, key=lambda b: b[0] * b[1])
        per_block = n * length * (6 * self.shape.hidden + 4 * self.shape.intermediate) * self.shape.dtype_bytes
        return per_block * (layers if grad else 2)

    def logits(self) -> float:
        n, length = max(self.batches, key=lambda b: b[0] * b[1])
        return n * length * self.shape.vocab * self.shape.dtype_bytes


STAGES = ("forward", "check", "anchor", "first_order", "local_exact", "exact", "verify", "curve", "trace", "merge")


def predict(
    stage: str,
    shape: ModelShape,
    rates: Rates,
    work: Workload,
    runtime_bytes: float,
    loaded: bool = False,
    donor_in_memory: bool = False,
) -> Prediction:
    """Peak memory and duration of ``stage`` (one of :data:`STAGES`; ``verify`` is the first-order screen
    followed by the exact part given by ``work.exact_depth``). ``runtime_bytes``: the process's resident
    memory now; ``loaded``: the pair is already in it (no load time, no new model memory);
    ``donor_in_memory``: a ``.bin``/GGUF donor, loaded whole instead of read lazily."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    m = _Model(shape, rates, work)
    size = float(shape.model_bytes)
    load_s = 0.0 if loaded or stage == "merge" else shape.load_bytes * (2 if donor_in_memory else 1) / rates.copy
    models = size * (2 if donor_in_memory else 1)
    setup_s = 2 * m.forward(unembed=False) + m.weights(shape.params)  # receiver + donor scores, all patched in
    # the donor's forward patches one block (or the embedding) at a time, keeping its originals
    streamed = max(shape.largest_tensor, shape.block_params) * shape.dtype_bytes
    setup_bytes = models + streamed + m.activations(m.anchor + 1)
    fo_s = 3 * m.forward(unembed=False) + m.weights(3 * shape.block_params * (m.anchor + 1))
    fo_bytes = models + m.activations(m.anchor + 1, grad=True) + 3 * 8 * shape.largest_block_tensor
    exact_s = m.blocks(work.exact_depth) + m.forward(unembed=False)  # + the block-input cache
    mlp_s = m.blocks(1) * 3 * shape.hidden * shape.intermediate / max(shape.block_params, 1)
    if stage == "forward":  # the logits come after the blocks' activations are freed
        seconds, peak = m.forward(), models + max(m.activations(shape.layers), m.logits())
    elif stage == "check":
        seconds, peak = m.weights(3 * shape.params), models + shape.largest_tensor * shape.dtype_bytes + 3 * 8 * 2**22
    elif stage == "anchor":
        top_s = 2 * m.forward(unembed=False) + m.weights(shape.params)
        gen_s = work.generated_tokens * 2 * (shape.params - shape.embed_params + shape.vocab * shape.hidden)
        seconds, peak = top_s + gen_s / rates.flops, setup_bytes
    elif stage == "first_order":
        seconds, peak = setup_s + fo_s, max(setup_bytes, fo_bytes)
    elif stage == "local_exact":
        neurons_s = work.neuron_layers * 2 * mlp_s + 4 * work.neurons * shape.hidden * m.tokens / rates.flops
        seconds = setup_s + fo_s + m.blocks(work.heads + work.blocks) + neurons_s
        peak = max(setup_bytes, fo_bytes)
    elif stage in ("exact", "verify"):
        seconds = setup_s + exact_s + (fo_s if stage == "verify" else 0.0)
        peak = max(setup_bytes, fo_bytes if stage == "verify" else 0.0)
    elif stage == "curve":
        seconds, peak = setup_s + work.curve_points * m.forward(unembed=False), setup_bytes
    elif stage == "trace":
        activation_s = m.blocks(work.exact_depth)
        seconds = setup_s + activation_s + 2 * fo_s + work.curve_points * m.forward(unembed=False)
        peak = max(setup_bytes, fo_bytes)
    else:  # merge: one output shard buffered, float32 copies of one tensor of the base, experts, result
        seconds = m.weights(shape.params * (work.experts + 2))
        shard = min(shape.params * (shape.stored_bytes or shape.dtype_bytes), MERGE_SHARD_BYTES)
        peak = shard + (work.experts + 3) * shape.largest_tensor * 4.0
    if not loaded and stage != "merge":
        peak = max(peak, shape.load_bytes + models - size)
    new = peak - (models if loaded else 0.0)
    return Prediction(stage, runtime_bytes + new, load_s + seconds, new, load_s)
