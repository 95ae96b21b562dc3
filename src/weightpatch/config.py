"""Configuration of every ``wpatch`` command as pydantic models.

Each command builds its config from an optional YAML file (``--config FILE``) overlaid with the
flags given on the command line (flags win). Unknown keys in the file are an error, so a typo does
not silently fall back to a default. Comma-separated strings are accepted for list fields
(``kinds: head,neuron`` or ``--kinds head,neuron``).

The resolved config is written into the run directory; :data:`RUN_ONLY_FIELDS` are the fields that
do not change results (where to run, how big the batches are, logging) and are ignored when a run
directory checks that a re-run uses the same configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from weightpatch.errors import WeightPatchError

RUN_ONLY_FIELDS = frozenset(
    {"device", "batch_size", "run_dir", "debug", "progress", "config"}
    | {"backend", "address", "workers", "worker_cpus", "worker_gpus"}  # where exact scores run (screen)
)

KindName = Literal["layer", "module", "head", "neuron"]
ScreenMethod = Literal["first_order", "exact", "verify", "integrated_gradients"]


def _split(value: Any) -> Any:
    """``"a,b"`` -> ``["a", "b"]``; lists of such strings are flattened; other values unchanged."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [p for v in value for p in _split(v)]
    return value


class CommonConfig(BaseModel):
    """Options that mean the same for every command."""

    model_config = ConfigDict(extra="forbid")

    device: str = "cpu"
    dtype: Literal["float32", "float64", "bfloat16", "float16", "auto"] = "float32"
    batch_size: int = Field(16, ge=1)
    seed: int = 0
    run_dir: Path | None = None
    debug: bool = False
    progress: bool = True

    def identity(self) -> dict[str, Any]:
        """The fields that determine the results (what a resumed run must match)."""
        data = self.model_dump(mode="json")
        return {k: v for k, v in data.items() if k not in RUN_ONLY_FIELDS}


class PairConfig(CommonConfig):
    base: str
    specialized: str
    trust_remote_code: bool = False
    revision: str | None = None

    def identity(self) -> dict[str, Any]:
        """Without the model locations: run directories identify the models by their weights' sha256."""
        data = super().identity()
        return {k: v for k, v in data.items() if k not in ("base", "specialized")}


class CheckConfig(PairConfig):
    pass


class PromptOptions(BaseModel):
    """Where prompts come from (mixed into commands that read prompts)."""

    prompts: Path
    heldout: Path | None = None
    max_prompts: int | None = Field(None, ge=2)
    chat_template: bool | None = None  # None: use the tokenizer's chat template when it has one


class AnchorConfig(PairConfig, PromptOptions):
    method: Literal["instruction", "model_diff"] = "instruction"
    layer: int | None = None
    layers: list[int] | None = None
    alphas: list[float] = [0.0, 0.5, 1.0, 2.0, 4.0]
    steering_prompts: int = Field(12, ge=0)
    max_new_tokens: int = Field(48, ge=1)

    _split_layers = field_validator("layers", "alphas", mode="before")(classmethod(lambda cls, v: _split(v)))


class ScreenConfig(PairConfig, PromptOptions):
    anchor: Path | None = None  # default: <run_dir>/anchor
    method: ScreenMethod = "verify"
    kinds: list[KindName] = ["head", "module", "neuron"]
    components: list[str] | None = None
    top_k: int = Field(20, ge=1)
    steps: int = Field(8, ge=2)
    variants_per_batch: int = Field(8, ge=1)
    min_relative_gap: float = Field(0.1, ge=0.0)
    # where exact scores run (weightpatch.backends): in this process, or sharded over Ray actors
    backend: Literal["local", "ray"] = "local"
    address: str | None = None  # Ray cluster address ("auto", "ray://host:10001"); None: start a local one
    workers: int | None = Field(None, ge=1)  # Ray actors; None: as many as the cluster's CPUs (GPUs) allow
    worker_cpus: float = Field(1.0, gt=0.0)  # per Ray actor (its torch threads)
    worker_gpus: float = Field(0.0, ge=0.0)  # per Ray actor (use with --device cuda)

    _split_lists = field_validator("kinds", "components", mode="before")(classmethod(lambda cls, v: _split(v)))


class TraceConfig(PairConfig, PromptOptions):
    anchor: Path | None = None
    target_names: list[str] | None = None
    targets: int = Field(3, ge=1)
    method: Literal["first_order", "exact"] = "first_order"

    _split_lists = field_validator("target_names", mode="before")(classmethod(lambda cls, v: _split(v)))


class MergeCommandConfig(CommonConfig):
    base: str
    experts: list[str]
    output: Path
    method: Literal["task_arithmetic", "ties", "dare_linear", "dare_ties"] = "task_arithmetic"
    mechanism: Literal["none", "owner_takes_top", "score_weighted"] = "none"
    scores: list[Path] = []
    score_method: str = "exact"
    top_k: int | None = Field(10, ge=1)
    threshold: float | None = None
    weights: list[float] | None = None
    lam: float = 1.0
    density: float = Field(1.0, gt=0.0, le=1.0)
    drop_rate: float = Field(0.5, ge=0.0, lt=1.0)
    mergekit_yaml: Path | None = None
    overwrite: bool = False

    _split_lists = field_validator("experts", "weights", "scores", mode="before")(classmethod(lambda cls, v: _split(v)))


class DemoConfig(CommonConfig):
    run_dir: Path | None = Path("wpatch-runs/demo")
    anchor_prompts: int = Field(48, ge=4)
    screen_prompts: int = Field(24, ge=2)
    steering_prompts: int = Field(12, ge=0)
    max_new_tokens: int = Field(48, ge=1)
    alphas: list[float] = [0.0, 0.5, 1.0, 2.0]
    top_k: int = Field(8, ge=1)
    kinds: list[KindName] = ["head", "module", "neuron"]

    _split_lists = field_validator("alphas", "kinds", mode="before")(classmethod(lambda cls, v: _split(v)))


C = TypeVar("C", bound=BaseModel)


def _describe(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e["loc"]) or "config"
        msg = e["msg"]
        if e["type"] == "missing":
            msg = "missing (give it as an argument, a flag or in --config)"
        elif e["type"] == "extra_forbidden":
            msg = "unknown option"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def read_config_file(path: Path | None) -> dict[str, Any]:
    """The mapping in a YAML (or JSON) config file; ``{}`` without a file."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise WeightPatchError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise WeightPatchError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WeightPatchError(f"config file {path} must hold a mapping of option: value, not {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type[C], config_file: Path | None = None, **flags: Any) -> C:
    """``cls`` from the config file overlaid with the flags that were given (not None)."""
    data = read_config_file(config_file)
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise WeightPatchError(f"invalid configuration: {_describe(exc)}") from None
