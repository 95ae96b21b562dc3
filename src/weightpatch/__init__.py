"""weightpatch: Weight Patching for source-level localization of capabilities in language models.

Data flows one way through the modules:

    pair (load, check)  ->  components (vocabulary, slices)  ->  patch (the operator)
        ->  anchors  ->  scoring / screening  ->  tracing / validation  ->  merging
        ->  pipeline (stages over run directories)  ->  report / cli

The method as implemented is in ``docs/method.md``; the stages to run are in :mod:`weightpatch.pipeline`.
``weightpatch.load_run(path)`` loads a finished run directory (configs, anchor, tables) without a
model; see :mod:`weightpatch.runs`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from weightpatch.errors import WeightPatchError

try:
    __version__ = version("weightpatch")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
__all__ = ["WeightPatchError", "__version__", "load_run"]


def __getattr__(name: str) -> Any:
    if name == "load_run":  # imported on first use: it pulls in pandas (and torch for the anchor)
        from weightpatch.runs import load_run

        return load_run
    raise AttributeError(f"module 'weightpatch' has no attribute {name!r}")
