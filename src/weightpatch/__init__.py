"""weightpatch: Weight Patching for source-level localization of capabilities in language models.

Data flows one way through the modules:

    pair (load, check)  ->  components (vocabulary, slices)  ->  patch (the operator)
        ->  anchors  ->  scoring / screening  ->  tracing / validation  ->  merging  ->  report / cli

``weightpatch.load_run(path)`` loads a finished run directory (configs, anchor, tables) without a
model; see :mod:`weightpatch.runs`.
"""

from __future__ import annotations

from typing import Any

from weightpatch.errors import WeightPatchError

__version__ = "0.1.0"
__all__ = ["WeightPatchError", "__version__", "load_run"]


def __getattr__(name: str) -> Any:
    if name == "load_run":  # imported on first use: it pulls in pandas (and torch for the anchor)
        from weightpatch.runs import load_run

        return load_run
    raise AttributeError(f"module 'weightpatch' has no attribute {name!r}")
