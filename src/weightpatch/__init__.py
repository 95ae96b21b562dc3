"""weightpatch: Weight Patching for source-level localization of capabilities in language models.

Data flows one way through the modules:

    pair (load, check)  ->  components (vocabulary, slices)  ->  patch (the operator)
        ->  anchors  ->  scoring / screening  ->  tracing / validation  ->  merging
        ->  pipeline (stages over run directories)  ->  report / cli

The method as implemented is in ``docs/method.md``; the stages to run are in :mod:`weightpatch.pipeline`.
"""

from importlib.metadata import PackageNotFoundError, version

from weightpatch.errors import WeightPatchError

try:
    __version__ = version("weightpatch")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
__all__ = ["WeightPatchError", "__version__"]
