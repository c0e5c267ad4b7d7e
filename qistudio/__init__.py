"""qistudio: generate, edit and train the Qwen-Image family of diffusion models.

The names below are imported on first use (`from qistudio import QwenImagePipeline` works as usual), so the
command line answers --help and argument errors without loading torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "QwenImagePipeline": "pipeline", "ModelConfig": "weights.model_config",
    "FlowMatchScheduler": "sampling.schedule", "ControlNetInput": "conditioning.control",
    "InputError": "validation",
}  # fmt: skip
__all__ = ["QwenImagePipeline", "ModelConfig", "FlowMatchScheduler", "ControlNetInput", "InputError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
