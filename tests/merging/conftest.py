from merging_testutil import tiny_checkpoints

__all__ = ["tiny_checkpoints"]
