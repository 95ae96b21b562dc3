"""Model merging (docs/method.md, "Mechanism-aware merging"): baselines (task arithmetic, TIES, DARE, DARE-TIES, a
Localize-and-Stitch localization baseline), a streaming checkpoint merge, the mechanism-aware
merge, and a mergekit YAML export."""

from weightpatch.merging.mechanism import (
    MechanismMerge,
    component_space_for_checkpoint,
    load_scores,
    owner_takes_top,
    score_weighted,
)
from weightpatch.merging.mergekit_export import mergekit_config, write_mergekit_yaml
from weightpatch.merging.methods import (
    METHODS,
    MergeConfig,
    dare_linear,
    dare_ties,
    localize_stitch,
    magnitude_trim,
    task_arithmetic,
    ties,
)
from weightpatch.merging.stream import Checkpoint, check_compatible, merge_checkpoints, open_checkpoint

__all__ = [
    "METHODS",
    "Checkpoint",
    "MechanismMerge",
    "MergeConfig",
    "check_compatible",
    "component_space_for_checkpoint",
    "dare_linear",
    "dare_ties",
    "load_scores",
    "localize_stitch",
    "magnitude_trim",
    "merge_checkpoints",
    "mergekit_config",
    "open_checkpoint",
    "owner_takes_top",
    "score_weighted",
    "task_arithmetic",
    "ties",
    "write_mergekit_yaml",
]
