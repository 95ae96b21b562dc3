"""Configuration of every pipeline stage as pydantic models: the one list of options.

A stage (:mod:`weightpatch.pipeline`) takes one of these configs, from Python or from ``wpatch``;
the CLI generates its flags from the fields here (name, type, default, ``description`` as help), so a
new field is a new flag with no second list. Configs are built from an optional YAML file
(``--config FILE``) overlaid with the flags given (flags win). Unknown keys are an error, so a typo
does not silently fall back to a default. Comma-separated strings are accepted for list fields
(``kinds: head,neuron`` or ``--kinds head,neuron``). Every float option must be finite (NaN and
inf are refused by name: a NaN threshold or steering strength would silently select nothing or
write NaN results), and options that exclude each other are refused together. A run directory's
own ``config.yaml`` (one section per command) can be given to ``--config``: the section of the
command being run is used.

The resolved config is written into the run directory. :meth:`StageConfig.identity` is the part that
determines results, which a resumed run must match: it leaves out where and how fast the run goes
(:data:`RUN_ONLY_FIELDS`) and where the inputs lie (models are identified by the SHA-256 of their
weights, prompt files by the SHA-256 of their content, in the run directory's record).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from weightpatch.errors import WeightPatchError
from weightpatch.merging.registry import MECHANISMS, METHODS, RULES, SCORE_SOURCES, SOURCES, STANDARD, choices_help
from weightpatch.methods import method_names, scoring_method

DEFAULT_RUN_DIR = Path("wpatch-runs/default")

RUN_ONLY_FIELDS = frozenset(
    {"device", "device_map", "max_memory", "batch_size", "run_dir", "debug", "progress", "variants_per_batch"}
    | {"backend", "address", "workers", "worker_cpus", "worker_gpus"}  # where exact scores run (screen)
)
# where the inputs lie: identified by content in the run record instead
LOCATION_FIELDS = frozenset({"base", "specialized", "prompts", "heldout", "anchor"})

KindName = Literal["layer", "module", "head", "neuron", "expert", "expert_neuron"]
# allowed values from the scoring-method registry (a tuple subscript is Literal's several values)
ScreenMethod = Literal[method_names("screen")]  # type: ignore[valid-type]
VerifyScreen = Literal[method_names("verify")]  # type: ignore[valid-type]
PromptFormat = Literal["auto", "chat", "raw"]
Dtype = Literal["float32", "float64", "bfloat16", "float16", "auto"]


def _split(value: Any) -> Any:
    """``"a,b"`` -> ``["a", "b"]``; lists of such strings are flattened; other values unchanged."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [p for v in value for p in _split(v)]
    return value


def _split_lists(*fields: str):
    """A before-validator that accepts comma-separated strings for the list ``fields``."""
    return field_validator(*fields, mode="before")(classmethod(lambda cls, v: _split(v)))


class Options(BaseModel):
    """The base of every config model: float options are finite (no NaN or inf), unknown keys are
    refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StageConfig(Options):
    """Options every command has."""

    run_dir: Path | None = Field(DEFAULT_RUN_DIR, description="run directory (created, or resumed when it exists).")
    seed: int = Field(0, description="random seed (prompt shuffling and splits, random controls, DARE).")
    progress: bool = Field(True, description="show progress bars (only when stderr is a terminal).")
    debug: bool = Field(False, description="show full tracebacks and debug logging.")

    @property
    def run_path(self) -> Path:
        return self.run_dir if self.run_dir is not None else DEFAULT_RUN_DIR

    def identity(self) -> dict[str, Any]:
        """The fields that determine the results (what a resumed run must match)."""
        data = self.model_dump(mode="json")
        return {k: v for k, v in data.items() if k not in RUN_ONLY_FIELDS | LOCATION_FIELDS}


class ModelOptions(Options):
    """How models are loaded."""

    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, mps, or auto (cuda, else mps, else cpu).")
    device_map: str | None = Field(
        None, description="auto: place the model across GPUs and CPU with accelerate (as transformers does)."
    )
    max_memory: str | None = Field(None, description="with --device-map: memory per device, e.g. 0=20GiB,cpu=60GiB.")
    dtype: Dtype = Field("float32", description="weight dtype: float32, float64, bfloat16, float16 or auto.")
    trust_remote_code: bool = Field(False, description="run the checkpoint's own code (custom architectures).")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of hub-id models.")


class PairOptions(ModelOptions):
    base: str = Field(description="base model: local directory, .gguf file or Hugging Face hub id.")
    specialized: str = Field(description="specialized model (fine-tuned from BASE): directory, .gguf file or hub id.")


class PromptOptions(Options):
    """Where prompts come from and how the model sees them."""

    prompts: Path = Field(
        description="IFEval-style JSONL (prompt_without_instruction needed by the instruction anchor), "
        "a CSV with a prompt column, or plain text with one prompt per line (recognised by content)."
    )
    max_prompts: int | None = Field(
        None, ge=2, description="use at most this many prompts per set (after shuffling with --seed)."
    )
    truncate_prompts: bool = Field(
        False, description="cut prompts longer than the model's context to their last tokens instead of refusing them."
    )
    prompt_format: PromptFormat = Field(
        "auto",
        description="chat: through the tokenizer's chat template; raw: the text as is; auto: chat when the "
        "tokenizer has a template.",
    )


class ScoringOptions(Options):
    batch_size: int = Field(16, ge=1, description="prompts per forward pass.")
    min_relative_gap: float = Field(
        0.1, ge=0.0, description="prompts whose anchor gap is below this fraction of the median gap are excluded."
    )
    variants_per_batch: int = Field(8, ge=1, description="patched variants run together in one forward pass.")
    first_order_stderr: bool = Field(
        True, description="first-order scores with a standard error across prompts (one backward per prompt)."
    )


class ObjectiveOptions(Options):
    """What a score recovers (docs/method.md, "Behaviour objective and anchor validity")."""

    objective: Literal["behaviour", "anchor"] = Field(
        "anchor",
        description="what a score recovers: anchor (the vector anchor's gap, the default) or behaviour (the "
        "teacher-forced log-probability of the specialized model's own greedy responses).",
    )
    response_tokens: int = Field(
        32, ge=1, description="tokens of each specialized response the behaviour objective scores (greedy)."
    )


class CheckConfig(StageConfig, PairOptions):
    run_dir: Path | None = Field(None, description="save the weight-change table in this run directory.")
    allow_nonfinite: bool = Field(False, description="list NaN/inf weights as a warning instead of refusing the pair.")


class AnchorConfig(StageConfig, PairOptions, PromptOptions):
    heldout: Path | None = Field(None, description="held-out prompt file (default: half of --prompts).")
    batch_size: int = Field(16, ge=1, description="prompts per forward pass.")
    method: Literal["instruction", "model_diff"] = Field(
        "instruction", description="instruction (with vs without instruction) or model_diff (specialized vs base)."
    )
    layer: int | None = Field(None, description="build the anchor at this layer (no search).")
    layers: list[int] | None = Field(None, description="layers to search, e.g. 2,4,6 (default: n//5..n step 2).")
    alphas: list[float] = Field([0.0, 0.5, 1.0, 2.0, 4.0], description="steering strengths in anchor gaps.")
    steering_prompts: int = Field(12, ge=0, description="held-out prompts for the steering check (0: skip).")
    max_new_tokens: int = Field(48, ge=1, description="tokens generated per steering prompt.")
    steering_random_directions: int = Field(
        5, ge=0, description="random unit directions added with the same strength, as a control (0: none)."
    )
    checker: Literal["builtin", "lm_eval"] = Field(
        "builtin",
        description="IFEval checkers of the steering metric: builtin (seven), or lm-eval's 25 (weightpatch[ifeval]).",
    )

    _lists = _split_lists("layers", "alphas")

    @model_validator(mode="after")
    def _one_layer_choice(self) -> AnchorConfig:
        if self.layer is not None and self.layers is not None:
            raise ValueError("give --layer (build at one layer) or --layers (search these), not both")
        return self


class ScreenConfig(StageConfig, PairOptions, PromptOptions, ScoringOptions, ObjectiveOptions):
    anchor: Path | None = Field(None, description="anchor path stem (default: RUN_DIR/anchor).")
    method: ScreenMethod = Field(
        "verify",
        description="; ".join(f"{m}: {scoring_method(m).help}" for m in method_names("screen")) + ".",
    )
    local_exact_blocks: int = Field(
        2,
        ge=1,
        description="local_exact: blocks run exactly from the component's own block before linearizing to "
        "the anchor (1: its own block only).",
    )
    screen: VerifyScreen = Field(
        "first_order",
        description="verify: the screen that ranks components ("
        + "; ".join(f"{m}: {scoring_method(m).help}" for m in method_names("verify"))
        + ").",
    )
    kinds: list[KindName] = Field(["head", "module", "neuron"], description="granularities: layer,module,head,neuron.")
    components: list[str] | None = Field(
        None, description="score only these (and, with verify, add them to the verified set), e.g. L1.attn.head2."
    )
    top_k: int = Field(20, ge=1, description="components per kind verified exactly (verify).")
    steps: int = Field(8, ge=2, description="integrated-gradient steps (integrated_gradients only).")
    backend: Literal["local", "ray"] = Field("local", description="where exact scores run: local or ray.")
    address: str | None = Field(None, description="Ray cluster address (auto, ray://host:10001); default: a local one.")
    workers: int | None = Field(None, ge=1, description="Ray actors, each loading the pair once (default: per CPU).")
    worker_cpus: float = Field(1.0, gt=0.0, description="CPUs per Ray actor (its torch threads).")
    worker_gpus: float = Field(0.0, ge=0.0, description="GPUs per Ray actor (with --device cuda).")
    validity_k: int = Field(
        16,
        ge=0,
        description="anchor validity check: patch the top-k components of one kind and measure anchor and "
        "behaviour recovery (0: skip).",
    )
    validity_controls: int = Field(5, ge=0, description="random k-subsets in the anchor validity check.")

    _lists = _split_lists("kinds", "components")

    @model_validator(mode="after")
    def _behaviour_engines(self) -> ScreenConfig:
        if self.objective == "behaviour":
            if "local_exact" in (self.method, self.screen if self.method == "verify" else None):
                raise ValueError(
                    "the behaviour objective has no local_exact screen (it reads after the last layer); "
                    "use --method first_order, exact or verify with --screen first_order"
                )
            if self.backend != "local":
                raise ValueError("the behaviour objective runs on the local backend only; drop --backend ray")
        return self


class TraceConfig(StageConfig, PairOptions, PromptOptions, ScoringOptions, ObjectiveOptions):
    anchor: Path | None = Field(None, description="anchor path stem (default: RUN_DIR/anchor).")
    targets: list[str] | None = Field(
        None, description="target components to trace, e.g. L2.attn.head1 (default: the strongest carriers)."
    )
    n_targets: int = Field(3, ge=1, description="without --targets: trace this many strongest carriers.")
    method: Literal["first_order", "exact"] = Field(
        "first_order", description="supplier scores: first_order (with the top --verify-top exact) or exact."
    )
    verify_top: int = Field(5, ge=0, description="first_order: suppliers per target re-scored exactly.")
    random_controls: int = Field(8, ge=5, description="random draws per k in the sufficiency/necessity curves.")

    _lists = _split_lists("targets")


class MergeStageConfig(StageConfig):
    """The merge stage (``merging.MergeConfig`` is the merge method itself)."""

    base: str = Field(description="base model: local directory, .gguf file or hub id.")
    experts: list[str] = Field(
        description="expert models fine-tuned from BASE: directories, .gguf files, hub ids or LoRA adapters."
    )
    output: Path = Field(description="directory for the merged model.")
    dtype: Literal["float32", "float64", "bfloat16", "float16"] | None = Field(
        None, description="dtype of the merged weights (default: each tensor's own dtype in the base)."
    )
    max_shard_size: str = Field("5GB", description="largest safetensors shard written, e.g. 2GB or 500MiB.")
    run_dir: Path | None = Field(None, description="append the merge (and its evaluation) to this run directory.")
    base_revision: str | None = Field(None, description="hub revision (branch, tag or commit) of a hub-id base.")
    expert_revisions: list[str] | None = Field(None, description="hub revision of each hub-id expert, one per expert.")
    method: Literal[METHODS] = Field(  # type: ignore[valid-type]
        "task_arithmetic", description=choices_help(STANDARD, "the standard merge. ")
    )
    mechanism: Literal[MECHANISMS] = Field(  # type: ignore[valid-type]
        "none", description=choices_help(RULES, "none (the standard merge alone), or a rule on component scores. ")
    )
    score_source: Literal[SOURCES] = Field(  # type: ignore[valid-type]
        "weight_patching", description=choices_help(SCORE_SOURCES, "component scores of a mechanism-aware rule. ")
    )
    scores: list[Path] = Field([], description="score table or run directory, one per expert (mechanism-aware).")
    snip_data: list[Path] = Field(
        [], description="--score-source snip: JSONL of each expert's texts (prompt, optional response), one per expert."
    )
    score_method: str = Field("exact", description="which scores of --scores to use.")
    score_kinds: list[KindName] | None = Field(
        None, description="use only these granularities of --scores, e.g. module (default: every one)."
    )
    top_k: int | None = Field(
        None, ge=1, description="components each expert owns (mechanism-aware; default: the rule's, e.g. 10)."
    )
    fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="instead of --top-k: the top fraction of each expert's scored components."
    )
    threshold: float | None = Field(None, description="minimum score of an owned component (mechanism-aware).")
    conflict: Literal["max", "blend", "mean", "drop"] | None = Field(
        None,
        description="entries owned by several experts: best score (max), blend by scores, mean, or drop them "
        "(default: the rule's; stitch: mean or drop).",
    )
    strength: float = Field(1.0, description="owner_takes_top, protect_then_add, stitch: scale of the owned deltas.")
    protect: int = Field(0, ge=0, description="protect_then_add: the protected expert (0 = the first).")
    floor: float = Field(
        RULES["score_weighted"].defaults["floor"], ge=0.0, description="score_weighted: weight of unscored entries."
    )
    others: float = Field(
        0.0, ge=0.0, description="owner_takes_top: share of the other experts' deltas kept on owned entries."
    )
    rest: float = Field(1.0, ge=0.0, description="owner_takes_top: weight of the standard merge outside owned entries.")
    weights: list[float] | None = Field(None, description="per-expert weights, e.g. 1,0.5.")
    lam: float = Field(1.0, description="task-arithmetic scaling lambda.")
    density: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="ties/localize_stitch keep fraction (default: the method's, "
        + ", ".join(f"{k} {v.defaults['density']}" for k, v in STANDARD.items() if "density" in v.defaults)
        + ").",
    )
    drop_rate: float = Field(0.5, ge=0.0, lt=1.0, description="DARE drop probability.")
    tall_lambda: float = Field(
        STANDARD["consensus"].defaults["tall_lambda"], ge=0.0, description="consensus: TALL-mask lambda."
    )
    min_agree: int = Field(
        STANDARD["consensus"].defaults["min_agree"], ge=1, description="consensus: experts whose masks must agree."
    )
    layer_owners: list[int] | None = Field(
        None, description="layer_swap: the expert of each decoder layer, -1 for the base, e.g. 0,0,1,1,0."
    )
    mergekit_yaml: Path | None = Field(None, description="also write the equivalent mergekit config here.")
    overwrite: bool = Field(False, description="replace an existing --output.")
    trust_remote_code: bool = Field(
        False, description="copy the base's custom code (auto_map, .py files) into the merge."
    )
    evaluate_prompts: list[Path] = Field(
        [], description="IFEval JSONL prompts, one per expert: add the merge evaluation table."
    )

    _lists = _split_lists(
        "experts",
        "expert_revisions",
        "weights",
        "scores",
        "score_kinds",
        "evaluate_prompts",
        "snip_data",
        "layer_owners",
    )

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in RUN_ONLY_FIELDS}


class ReportConfig(Options):
    run_dir: Path = Field(description="a run directory written by wpatch.")
    output: Path | None = Field(None, description="where to write the report (default: RUN_DIR/report.html).")
    debug: bool = Field(False, description="show full tracebacks.")


class DemoConfig(StageConfig, ModelOptions):
    run_dir: Path | None = Field(Path("wpatch-runs/demo"), description="run directory of the demo.")
    base: str | None = Field(None, description="replace the shipped base model.")
    specialized: str | None = Field(None, description="replace the shipped specialized model.")
    prompts: Path | None = Field(None, description="replace the shipped anchor prompts.")
    heldout: Path | None = Field(None, description="replace the shipped held-out prompts.")
    batch_size: int = Field(16, ge=1, description="prompts per forward pass.")
    anchor_prompts: int = Field(48, ge=4, description="prompts per set for the anchor search.")
    screen_prompts: int = Field(24, ge=2, description="held-out prompts scored when screening and tracing.")
    steering_prompts: int = Field(12, ge=0, description="prompts generated per steering alpha.")
    max_new_tokens: int = Field(48, ge=1, description="tokens generated per steering prompt.")
    alphas: list[float] = Field([0.0, 0.5, 1.0, 2.0], description="steering strengths in anchor gaps.")
    top_k: int = Field(8, ge=1, description="components per kind verified exactly.")
    kinds: list[KindName] = Field(["head", "module", "neuron"], description="granularities screened.")

    _lists = _split_lists("alphas", "kinds")


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
        elif e["type"] == "finite_number":
            msg = f"{e['input']} is not a finite number (NaN and inf are refused); give a finite value"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def read_config_file(path: Path | None, command: str | None = None) -> dict[str, Any]:
    """The mapping in a YAML (or JSON) config file; ``{}`` without a file. A run directory's
    ``config.yaml`` holds one section per command: with ``command`` given and present as a section,
    that section is returned."""
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
    if command is not None and isinstance(data.get(command), dict):
        data = data[command]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type[C], config_file: Path | None = None, command: str | None = None, **flags: Any) -> C:
    """``cls`` from the config file (its ``command`` section, if it has one) overlaid with the flags
    that were given (not None)."""
    data = read_config_file(config_file, command)
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise WeightPatchError(f"invalid configuration: {_describe(exc)}") from None
