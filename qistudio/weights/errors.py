"""Errors a user can cause while loading weights; each message names the files and tensors concerned."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model it should hold."""
