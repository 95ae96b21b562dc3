"""The cost prediction every stage prints before it loads anything, and the refusal when the memory
will not fit (model: :mod:`weightpatch.cost`).

:func:`forecast` is the one call a stage makes: it reads the base model's config (no weights), the
prompts' token counts (the tokenizer only), the anchor layer (``anchor.json``) and the components,
measures this machine's rates, logs ``<stage>: predicted peak ... GB, about ...`` to the console and
raises :class:`~weightpatch.errors.WeightPatchError` when the memory the stage adds exceeds what is
available (``psutil``: available RAM; on CUDA the device's free memory).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, TypeVar

import torch

from weightpatch import cost
from weightpatch.components import ComponentSpace
from weightpatch.config import AnchorConfig, CheckConfig, MergeStageConfig, ScreenConfig, TraceConfig
from weightpatch.errors import WeightPatchError
from weightpatch.loading import _torch_dtype, resolve_device, split_model_source
from weightpatch.pair import ModelPair
from weightpatch.pipeline.inputs import anchor_prompt_sets, anchor_stem, select_prompts
from weightpatch.rundir import CONSOLE
from weightpatch.runner import render_prompts

logger = logging.getLogger("weightpatch")
FIXES = (
    "--dtype bfloat16 (half of float32), a LoRA adapter or safetensors (lazy) donor, fewer prompts "
    "(--max-prompts), --device-map auto (layers offloaded), or --backend ray on a larger machine"
)
Config = CheckConfig | AnchorConfig | ScreenConfig | TraceConfig | MergeStageConfig
T = TypeVar("T")


def available_bytes(device: str = "cpu") -> float:
    """Memory a stage may still take: free device memory on CUDA, else available RAM."""
    if device.startswith("cuda"):
        return float(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return float(psutil.virtual_memory().available)


def resident_bytes(device: str = "cpu") -> float:
    """What this process holds now where the stage will allocate (CUDA: allocated by torch)."""
    if device.startswith("cuda"):
        return float(torch.cuda.memory_allocated(torch.device(device)))
    import psutil

    return float(psutil.Process().memory_info().rss)


def _meta(base: str, trust_remote_code: bool, revision: str | None) -> tuple[Any, ComponentSpace]:
    """The base model's config and its component space on a ``meta`` instance (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source, gguf = split_model_source(base)
    config = AutoConfig.from_pretrained(
        Path(source).expanduser() if Path(source).expanduser().is_dir() else source,
        gguf_file=gguf,
        trust_remote_code=trust_remote_code,
        revision=revision,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return config, ComponentSpace.from_model(model)


def _token_counts(cfg: Config, texts: list[str], pair: ModelPair | None) -> tuple[int, ...]:
    from transformers import AutoTokenizer

    tokenizer = pair.tokenizer if pair is not None else AutoTokenizer.from_pretrained(split_model_source(cfg.base)[0])
    rendered = render_prompts(tokenizer, texts, getattr(cfg, "prompt_format", "raw"))
    return tuple(len(ids) for ids in tokenizer(rendered)["input_ids"])


def _anchor_layer(cfg: ScreenConfig | TraceConfig) -> int | None:
    meta = anchor_stem(cfg, cfg.anchor).with_suffix(".json")
    return int(json.loads(meta.read_text())["layer"]) if meta.is_file() else None


def _donor_in_memory(specialized: str) -> bool:
    """A GGUF or ``.bin``-only local donor is loaded whole (everything else is read lazily)."""
    source, gguf = split_model_source(specialized)
    path = Path(source).expanduser()
    has_lazy = any(path.glob("*.safetensors")) or (path / "adapter_config.json").is_file()
    return bool(gguf) or (path.is_dir() and not has_lazy)


def _of(cfg: Config, kind: type[T], stage: str) -> T:
    """``cfg`` as the config class of ``stage`` (a stage is always given its own class)."""
    if not isinstance(cfg, kind):
        raise TypeError(f"the {stage} stage takes a {kind.__name__}, not a {type(cfg).__name__}")
    return cfg


def _anchor_workload(cfg: AnchorConfig, space: ComponentSpace, pair: ModelPair | None) -> cost.Workload:
    train, heldout = anchor_prompt_sets(cfg, warn=False)  # the stage warns
    texts = [r.prompt for r in train + heldout]
    if cfg.method == "instruction":
        texts += [r.prompt_without_instruction or r.prompt for r in train + heldout]
    layer = cfg.layer if cfg.layer is not None else max(cfg.layers or [space.num_layers - 1])
    steered = min(cfg.steering_prompts, len(heldout)) if cfg.alphas else 0
    runs = len(cfg.alphas) + cfg.steering_random_directions * sum(1 for a in cfg.alphas if a) + 2
    return cost.Workload(
        tokens=_token_counts(cfg, texts, pair),
        batch_size=cfg.batch_size,
        anchor_layer=layer,
        generated_tokens=steered * cfg.max_new_tokens * runs,
    )


def _screen_workload(
    cfg: ScreenConfig, space: ComponentSpace, tokens: tuple[int, ...], layer: int | None, top: int
) -> tuple[str, cost.Workload]:
    names = [space.parse(c) for c in cfg.components] if cfg.components else list(space.components(kinds=cfg.kinds))
    reach = [c for c in names if space.first_affected_layer(c) <= top]
    neurons = [c for c in reach if c.kind == "neuron"]
    counts = {
        "heads": sum(1 for c in reach if c.kind == "head"),
        "neurons": len(neurons),
        "neuron_layers": len({c.layer for c in neurons}),
    }
    counts["blocks"] = len(reach) - counts["heads"] - counts["neurons"]
    depth = sum(top - space.first_affected_layer(c) + 1 for c in reach)
    method: str = "first_order" if cfg.method == "integrated_gradients" else cfg.method
    if method == "verify":  # top_k per kind, at the mean depth of the screened components
        chosen = min(len(reach), cfg.top_k * len(cfg.kinds) + len(cfg.components or []))
        depth = round(depth / max(len(reach), 1) * chosen)
    if method == "exact":
        counts = {"blocks": len(reach)}
    return method, cost.Workload(tokens, cfg.batch_size, layer, exact_depth=depth, **counts)


def workload(stage: str, cfg: Config, space: ComponentSpace, pair: ModelPair | None) -> tuple[str, cost.Workload]:
    """The cost-model stage name and workload of ``cfg`` for pipeline stage ``stage``."""
    if stage == "check":
        return "check", cost.Workload(tokens=())
    if stage == "merge":
        return "merge", cost.Workload(tokens=(), experts=len(_of(cfg, MergeStageConfig, stage).experts))
    if stage == "anchor":
        return "anchor", _anchor_workload(_of(cfg, AnchorConfig, stage), space, pair)
    scoring = _of(cfg, TraceConfig, stage) if stage == "trace" else _of(cfg, ScreenConfig, stage)
    tokens = _token_counts(scoring, [r.prompt for r in select_prompts(scoring, scoring.seed, warn=False)], pair)
    layer = _anchor_layer(scoring)
    top = space.num_layers - 1 if layer is None else layer
    if isinstance(scoring, TraceConfig):
        sites = [c for c in space.components(kinds=("module", "head"), layers=range(top + 1))]
        curves = 2 * 3 * 4 * (1 + scoring.random_controls)  # (sufficiency, necessity) x 3 rankings x 4 k
        depth = sum(max(top - space.first_affected_layer(c) + 1, 0) for c in sites)
        return "trace", cost.Workload(tokens, scoring.batch_size, layer, exact_depth=depth, curve_points=curves)
    return _screen_workload(scoring, space, tokens, layer, top)


@functools.lru_cache(maxsize=8)
def _rates(shape: cost.ModelShape, dtype: torch.dtype, device: str) -> cost.Rates:
    """This machine's rates for ``shape``, measured once per process (the stages of one notebook or demo)."""
    return cost.measure_rates(shape, dtype, device)


def forecast(stage: str, cfg: Config, pair: ModelPair | None = None) -> cost.Prediction | None:
    """Log the predicted peak memory and duration of pipeline ``stage`` (check, anchor, screen, trace,
    merge) run with ``cfg`` (``pair``: already loaded), and refuse when it will not fit in memory. None
    (nothing logged) when the base's config cannot be read: the stage reports that input itself."""
    device = str(resolve_device(getattr(cfg, "device", "cpu")))  # an unavailable device: one line, here
    dtype = getattr(cfg, "dtype", "auto")  # merge: the checkpoints' own dtype
    try:
        config, space = _meta(cfg.base, getattr(cfg, "trust_remote_code", False), getattr(cfg, "revision", None))
    except (OSError, ValueError) as exc:  # missing, unreachable or unknown model: the loader's error says which
        logger.debug("no cost prediction for %s: %s", stage, exc)
        return None
    shape = cost.shape_of_config(config, dtype)
    torch_dtype = _torch_dtype(dtype)
    rates = _rates(shape, torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.float32, device)
    name, work = workload(stage, cfg, space, pair)
    donor_whole = not isinstance(cfg, MergeStageConfig) and _donor_in_memory(cfg.specialized)  # merge: streamed
    prediction = cost.predict(name, shape, rates, work, resident_bytes(device), pair is not None, donor_whole)
    available = available_bytes(device)
    label = f"{stage} ({name})" if name != stage else stage
    logger.info("%s", prediction.message(available).replace(name, label, 1), extra=CONSOLE)
    if prediction.new_bytes > available:
        raise WeightPatchError(
            f"{label} needs about {prediction.new_bytes / cost.GiB:.1f} GB more memory but "
            f"{available / cost.GiB:.1f} GB are available; use {FIXES}"
        )
    return prediction
