"""User-facing errors. Every problem the user can fix raises a :class:`WeightPatchError` whose
message names the problem and the fix; the CLI prints it on one line and exits with code 2."""


class WeightPatchError(Exception):
    """A problem with the user's input (models, prompts, names, run directory), not a bug."""


class PairMismatchError(WeightPatchError):
    """The base and specialized models cannot be patched into each other."""


class UnknownArchitectureError(WeightPatchError):
    """No architecture description covers this model type."""


class ComponentError(WeightPatchError):
    """A component name that does not parse or does not exist in this model."""


class ArchitectureDescriptionError(WeightPatchError):
    """An architecture description file (or its fit to a model) is wrong: names the file, the key
    and the fix."""
