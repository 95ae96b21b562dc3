"""weightpatch: Weight Patching for source-level localization of capabilities in language models.

Data flows one way through the modules:

    pair (load, check)  ->  components (vocabulary, slices)  ->  patch (the operator)
        ->  anchors  ->  scoring / screening  ->  tracing / validation  ->  merging  ->  report / cli
"""

from weightpatch.errors import WeightPatchError

__version__ = "0.1.0"
__all__ = ["WeightPatchError", "__version__"]
