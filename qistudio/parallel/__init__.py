"""Several devices for one generation: cfg, Ulysses and ring sequence parallelism, data parallelism.

`QwenImagePipeline.enable_parallelism(...)` is the entry; the command line's `--parallel` launches the ranks.
Names here import lazily: `degrees` (pure Python) serves the command line before torch loads.
"""

from __future__ import annotations

from .degrees import Degrees, ParallelConfigError, parse_degrees, resolve_degrees

__all__ = ["Degrees", "ParallelConfigError", "parse_degrees", "resolve_degrees", "local_device", "ParallelError"]


def __getattr__(name: str):
    if name == "local_device":
        from .mesh import local_device

        return local_device
    if name == "ParallelError":
        from .collectives import ParallelError

        return ParallelError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
