"""The errors a training run stops with, importable without torch: the CLI catches them and prints one line."""

from __future__ import annotations


class CheckpointSaveError(RuntimeError):
    """Saving a resume checkpoint failed; the previous one (if any) is intact."""


class NonFiniteError(RuntimeError):
    """A step's loss, or the weights about to be saved, are NaN or infinite: the run stops, nothing NaN is saved."""


class RunLockedError(RuntimeError):
    """Another run is writing to the same output folder."""


class ProcessGroupError(RuntimeError):
    """Another process of a multi-process run died or stopped answering; this one stops too."""


class RunStopped(KeyboardInterrupt):
    """The launcher stopped this process (SIGTERM), most often because another process of the run failed."""
