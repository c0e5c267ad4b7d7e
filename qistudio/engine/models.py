"""What a worker loads: the model's ModelConfigs as plain data, and the speed options, turned into a pipeline.

The face decides where the weights come from (the CLI's `--model`/`--demo` rules build the ModelConfigs) and hands
them over as dictionaries of ModelConfig's fields, so the engine holds no model-finding logic of its own and the
spec crosses into a spawned worker as plain data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# ModelConfig fields that say where weights come from; offload settings belong to the speed options instead.
_SOURCE_FIELDS = ("path", "model_id", "origin_file_pattern", "download_source", "local_model_path", "skip_download")


def config_fields(config) -> dict | None:
    """A ModelConfig as plain data (its source fields), None for None."""
    if config is None:
        return None
    return {name: getattr(config, name) for name in _SOURCE_FIELDS}


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve: its public name, its ModelConfigs as fields, and how to run it."""

    name: str
    model_configs: tuple[dict, ...]
    tokenizer_config: dict | None = None
    processor_config: dict | None = None
    dtype: str | None = None  # "bfloat16", "float16", "float32"; None: bfloat16 on a GPU, float32 on the CPU
    fp8: bool = False
    vram_limit: float | None = None  # GiB; None: everything stays on the device
    compile: bool = False
    extra: dict = field(default_factory=dict)  # shown by /v1/models (e.g. {"demo": True})

    @classmethod
    def from_configs(cls, name: str, configs, tokenizer_config=None, processor_config=None, **options) -> "ModelSpec":
        return cls(name, tuple(config_fields(c) for c in configs), config_fields(tokenizer_config),
                   config_fields(processor_config), **options)

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)


def dtype_for(spec: ModelSpec, device: str):
    import torch

    name = spec.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return getattr(torch, name)


def load_pipeline(spec: ModelSpec, device: str):
    """The pipeline a worker owns, loaded on `device` with the spec's speed options (FP8 before any LoRA)."""
    from ..pipeline import QwenImagePipeline
    from ..weights.model_config import ModelConfig

    def config(fields):
        return None if fields is None else ModelConfig(**fields)

    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=dtype_for(spec, device), device=device, model_configs=[config(c) for c in spec.model_configs],
        tokenizer_config=config(spec.tokenizer_config), processor_config=config(spec.processor_config),
    )  # fmt: skip
    if spec.fp8:
        pipe.enable_fp8_computation()
    if spec.vram_limit is not None:
        pipe.enable_vram_management(vram_limit=spec.vram_limit)
    if spec.compile:
        pipe.compile()
    return pipe
