"""The embedded demo pair: a tiny Llama ``base`` model and its ``specialized`` fine-tune.

The base ignores format instructions; the specialized model follows six IFEval format constraints
when (and only when) the prompt asks. Both ship inside the package (float32 safetensors, Hugging Face
format) with their prompt sets; :mod:`weightpatch.demo.train` is the recipe that produced them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from weightpatch.errors import WeightPatchError

SPLITS: tuple[str, ...] = ("anchor", "heldout")


@dataclass(frozen=True)
class DemoPaths:
    base: Path
    specialized: Path
    data: Path
    training_record: Path


def _root() -> Path:
    # The package is a plain directory (wheels and editable installs both); no zip import support.
    return Path(str(resources.files("weightpatch.demo")))


def paths() -> DemoPaths:
    """Directories of the shipped models and prompt files."""
    root = _root()
    p = DemoPaths(
        base=root / "weights" / "base",
        specialized=root / "weights" / "specialized",
        data=root / "data",
        training_record=root / "weights" / "training.json",
    )
    for d in (p.base, p.specialized):
        if not (d / "config.json").is_file():
            raise WeightPatchError(
                f"{d}: the demo weights are missing from this installation; "
                "retrain them with `python -m weightpatch.demo.train --out <dir>` or reinstall weightpatch"
            )
    return p


def prompt_path(split: str) -> Path:
    if split not in SPLITS:
        raise WeightPatchError(f"unknown demo prompt split {split!r}; choose one of {', '.join(SPLITS)}")
    return _root() / "data" / f"{split}.jsonl"


def prompts(split: str = "heldout"):
    """The demo prompts of ``split`` as :class:`weightpatch.prompts.PromptRecord` objects."""
    from weightpatch.prompts import load_prompts

    return load_prompts(prompt_path(split))


def load_pair(dtype=None):
    """``(base_model, specialized_model, tokenizer)`` loaded from the shipped directories."""
    import torch

    from weightpatch.generation import load_model

    p = paths()
    base, tokenizer = load_model(p.base, dtype or torch.float32)
    specialized, _ = load_model(p.specialized, dtype or torch.float32)
    return base, specialized, tokenizer
