"""What a merge checks about its inputs before (and while) writing anything.

* every expert against the base, like the pair check of :mod:`weightpatch.pair`: model type,
  architecture, parameter names and shapes, tokenizer vocabulary (a vocabulary-permuted expert is
  refused: its embedding rows mean other tokens, and averaging them with the base's is garbage);
* custom code in the base (``auto_map`` in its configs, ``.py`` files), which a merge would copy
  into its output: refused unless ``trust_remote_code`` is given;
* finiteness of every input tensor and every merged tensor (:class:`FiniteGuard`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from weightpatch.errors import PairMismatchError, WeightPatchError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
_CONFIG_FILES = ("config.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json")


def custom_code_files(directory: Path) -> list[str]:
    """Why ``directory`` carries custom code: its ``.py`` files and the configs with ``auto_map``."""
    found = sorted(p.name for p in directory.iterdir() if p.suffix == ".py" and p.is_file())
    for name in _CONFIG_FILES:
        try:
            data = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "auto_map" in data:
            found.append(f"{name} (auto_map)")
    return found


def refuse_custom_code(base: Path, trust_remote_code: bool) -> list[str]:
    """The custom-code findings of ``base`` (copied into the merge and recorded when
    ``trust_remote_code``); without it a base with custom code is refused."""
    found = custom_code_files(base)
    if found and not trust_remote_code:
        raise WeightPatchError(
            f"the base {base} has custom code ({', '.join(found)}), which the merge would copy into its output; "
            f"review it and pass trust_remote_code=True (--trust-remote-code) to copy it, or merge a base without it"
        )
    return found


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def check_experts_against_base(
    base: Path, experts: Sequence[Path], custom_code: bool, labels: Sequence[Path] | None = None
) -> list[bool]:
    """Run the pair check of :func:`weightpatch.pair.pair_differences` between the base and each
    expert (configs, parameter shapes, tokenizer vocabulary); raise :class:`PairMismatchError`
    naming the first offending expert and its first differences. Tensor names and shapes in the
    files are checked separately (:func:`weightpatch.merging.stream.check_compatible`).

    ``custom_code``: the base has custom code (allowed by the caller); its config classes are then
    not instantiated and only the vocabulary is compared. Returns, per expert, whether a tokenizer
    vocabulary was compared (both directories hold tokenizer files). ``labels``: how the error names
    the base and the experts (default: their directories; a GGUF input is named by its file)."""
    from weightpatch.loading import _config, _tokenizer
    from weightpatch.pair import _vocab_differences, list_problems, pair_differences

    has_config = (base / "config.json").is_file()
    base_config = _config(base, None, False) if has_config and not custom_code else None
    base_tok = _tokenizer(base, None, False) if _has_tokenizer(base) else None
    names = list(labels) if labels is not None else [base, *experts]
    compared = []
    for expert, name in zip(experts, names[1:], strict=True):
        expert_tok = _tokenizer(expert, None, False) if base_tok is not None and _has_tokenizer(expert) else None
        if base_config is not None and (expert / "config.json").is_file():
            problems = pair_differences(base_config, _config(expert, None, False), base_tok, expert_tok)
        else:
            problems = _vocab_differences(base_tok, expert_tok) if expert_tok is not None else []
        if problems:
            raise PairMismatchError(
                f"expert {name} cannot be merged into the base {names[0]}: {list_problems(problems)}. Every expert "
                f"must be fine-tuned from the base (same architecture, parameter shapes and tokenizer vocabulary)"
            )
        compared.append(expert_tok is not None)
    return compared


class FiniteGuard:
    """Collects the names of non-finite tensors (NaN or inf) seen during a merge, per source
    (``"base"``, ``"expert 1"``, ``"merged"``); :meth:`raise_if_any` refuses the merge listing the
    first ``limit`` of them. A merge never writes a shard once a non-finite tensor was seen."""

    def __init__(self, sources: dict[str, Path], limit: int = 5) -> None:
        self.sources = sources
        self.limit = limit
        self.found: list[tuple[str, str]] = []

    @property
    def full(self) -> bool:
        return len(self.found) >= self.limit

    def check(self, source: str, name: str, tensor: torch.Tensor) -> bool:
        """Record ``tensor`` when it is floating point and not finite; True when it is fine."""
        if not tensor.dtype.is_floating_point or bool(torch.isfinite(tensor).all()):
            return True
        self.found.append((source, name))
        return False

    def raise_if_any(self) -> None:
        if not self.found:
            return
        inputs = [(s, n) for s, n in self.found if s != "merged"]
        listed = ", ".join(f"{n} ({s} {self.sources[s]})" if s in self.sources else f"{n} ({s})" for s, n in self.found)
        more = " (first ones listed)" if self.full else ""
        fix = (
            "fix or re-export the inputs holding NaN/inf"
            if inputs
            else "the merged values overflow the output dtype; use a smaller lam/weights or out_dtype=float32"
        )
        raise WeightPatchError(f"refusing to write a merge with non-finite values: {listed}{more}; {fix}")
