"""Model merging (docs/method.md, "Mechanism-aware merging"): baselines (task arithmetic, TIES, DARE,
DARE-TIES, a Localize-and-Stitch localization baseline, TALL-mask consensus, layer swapping), a
streaming checkpoint merge, the mechanism-aware rules, score sources, and a mergekit YAML export.

The names below are imported on first use (PEP 562), so that importing the torch-free
:mod:`weightpatch.merging.registry` (as the config does) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "mechanism": (
        "MechanismMerge",
        "component_space_for_checkpoint",
        "load_scores",
        "owner_takes_top",
        "protect_then_add",
        "score_weighted",
        "stitch",
    ),
    "mergekit_export": ("mergekit_config", "write_mergekit_yaml"),
    "methods": (
        "MergeConfig",
        "consensus",
        "dare_linear",
        "dare_ties",
        "layer_swap",
        "localize_stitch",
        "magnitude_trim",
        "task_arithmetic",
        "ties",
    ),
    "registry": ("METHODS", "MECHANISMS", "SOURCES"),
    "scores": ("magnitude_scores", "random_scores", "snip_scores"),
    "stream": ("Checkpoint", "check_compatible", "merge_checkpoints", "open_checkpoint"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'weightpatch.merging' has no attribute {name!r}")
    return getattr(importlib.import_module(f"weightpatch.merging.{module}"), name)
