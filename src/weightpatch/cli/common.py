"""What every subcommand shares: the common options, error handling, loading the pair and prompts."""

from __future__ import annotations

import functools
import logging
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from weightpatch.config import CommonConfig, PairConfig, PromptOptions
from weightpatch.errors import WeightPatchError

DEFAULT_RUN_DIR = Path("wpatch-runs/default")
console = Console(stderr=True)
out = Console()

# ---- options with the same meaning everywhere (None: take the config file's value or the default)
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML file with any of this command's options; flags override it.")
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="torch device: cpu, cuda, cuda:1, mps. [default: cpu]")]
DtypeOpt = Annotated[
    str | None, typer.Option("--dtype", help="float32, float64, bfloat16, float16 or auto. [default: float32]")
]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="prompts per forward pass. [default: 16]")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="random seed (prompt splits, DARE). [default: 0]")]
RunDirOpt = Annotated[
    Path | None,
    typer.Option("--run-dir", help=f"run directory (created, or resumed when it exists). [default: {DEFAULT_RUN_DIR}]"),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show full tracebacks and debug logging.")]
ProgressOpt = Annotated[bool | None, typer.Option("--progress/--no-progress", help="show progress bars.")]
BaseArg = Annotated[str, typer.Argument(help="base model: local directory or Hugging Face hub id.")]
SpecArg = Annotated[str, typer.Argument(help="specialized model (fine-tuned from BASE): directory or hub id.")]
PromptsOpt = Annotated[
    Path | None,
    typer.Option(
        "--prompts",
        help="IFEval-style JSONL (with prompt_without_instruction for the instruction anchor) or a .txt "
        "file with one prompt per line.",
    ),
]
HeldoutOpt = Annotated[
    Path | None, typer.Option("--heldout", help="held-out prompt file (default: half of --prompts).")
]
MaxPromptsOpt = Annotated[int | None, typer.Option("--max-prompts", help="use at most this many prompts per set.")]
TrustOpt = Annotated[
    bool | None, typer.Option("--trust-remote-code/--no-trust-remote-code", help="run the checkpoint's own code.")
]

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> None:
    """One line on stderr, exit code 2."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(2)


def handle_errors(fn: F) -> F:
    """Turn user errors (:class:`WeightPatchError`) into a one-line message and exit code 2;
    with ``--debug`` let them (and everything else) raise with a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        logging.getLogger("weightpatch").setLevel(logging.DEBUG if debug else logging.INFO)
        try:
            return fn(*args, **kwargs)
        except WeightPatchError as exc:
            if debug:
                raise
            fail(str(exc))
        except KeyboardInterrupt:
            typer.echo("interrupted; re-run the same command to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_pair(cfg: PairConfig, receiver: str = "base"):
    from weightpatch.pair import load_pair

    seed_everything(cfg.seed)
    with console.status(f"loading {cfg.base} and {cfg.specialized}", spinner="dots"):
        return load_pair(
            cfg.base,
            cfg.specialized,
            receiver=receiver,  # type: ignore[arg-type]
            dtype=cfg.dtype,
            device=cfg.device,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
        )


def run_dir_of(cfg: CommonConfig) -> Path:
    return cfg.run_dir if cfg.run_dir is not None else DEFAULT_RUN_DIR


def read_prompt_file(path: Path) -> list:
    """Prompt records from an IFEval JSONL file, or from a text file with one prompt per line."""
    from weightpatch.prompts import PromptRecord, load_prompts

    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return load_prompts(path)
    if not path.is_file():
        raise WeightPatchError(f"{path}: prompt file not found")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise WeightPatchError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    records = [PromptRecord(key=i, prompt=line, instruction_id_list=[], kwargs=[]) for i, line in enumerate(lines)]
    records = [r for r in records if r.prompt]
    if not records:
        raise WeightPatchError(f"{path}: no prompts (the file is empty); expected one prompt per line")
    return records


def load_prompt_sets(cfg: PromptOptions, seed: int) -> tuple[list, list]:
    """``(train, heldout)`` prompt records: the two files, or ``--prompts`` split in half."""
    records = read_prompt_file(cfg.prompts)
    rng = random.Random(seed)
    if cfg.heldout is not None:
        train, heldout = list(records), read_prompt_file(cfg.heldout)
        rng.shuffle(train)
        rng.shuffle(heldout)
    else:
        if len(records) < 4:
            raise WeightPatchError(
                f"{cfg.prompts}: {len(records)} prompts are too few to split into training and held-out "
                f"halves; give at least 4, or a --heldout file"
            )
        shuffled = list(records)
        rng.shuffle(shuffled)
        half = len(shuffled) // 2
        train, heldout = shuffled[:half], shuffled[half:]
    if cfg.max_prompts is not None:
        train, heldout = train[: cfg.max_prompts], heldout[: cfg.max_prompts]
    return train, heldout


def echo_path(label: str, path: Path) -> None:
    out.print(f"{label}: {path}")


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
