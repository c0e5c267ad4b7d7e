"""What a worker loads: the model's ModelConfigs as plain data, and the speed options, turned into a pipeline.

The face decides where the weights come from (the CLI's `--model`/`--demo` rules build the ModelConfigs) and hands
them over as dictionaries of ModelConfig's fields, so the engine holds no model-finding logic of its own and the
spec crosses into a spawned worker as plain data. The face also names the model's family (which pipe(...) its
jobs are checked against before they are queued: Qwen-Image, Qwen-Image-Layered or Qwen-Image 2.1); the worker
checks that the files it loaded are that family's, so a wrong name fails at start, not on a job. Blockwise
ControlNets are loaded after the model, in order (a job names them; their index is the pipeline's controlnet_id),
and a Qwen-Image-Layered model may be served beside a Qwen-Image one (`layered`), loaded by each worker on its
first layers job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# ModelConfig fields that say where weights come from; offload settings belong to the speed options instead.
_SOURCE_FIELDS = ("path", "model_id", "origin_file_pattern", "download_source", "local_model_path", "skip_download")
QWEN_IMAGE, LAYERED, QWEN21 = "qwen-image", "qwen-image-layered", "qwen-image-2.1"
FAMILIES = {QWEN_IMAGE: "Qwen-Image", LAYERED: "Qwen-Image-Layered", QWEN21: "Qwen-Image 2.1"}


def family_name(family: str | None) -> str:
    return FAMILIES.get(family or QWEN_IMAGE, str(family))


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
    family: str = QWEN_IMAGE
    controlnets: tuple[tuple[str, dict], ...] = ()  # (name, ModelConfig fields) of Blockwise ControlNets, in order
    layered: "ModelSpec | None" = None  # a Qwen-Image-Layered model served beside this one

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")

    @classmethod
    def from_configs(cls, name: str, configs, tokenizer_config=None, processor_config=None, controlnets=(),
                     **options) -> "ModelSpec":
        """`controlnets`: (name, ModelConfig) pairs."""
        return cls(name, tuple(config_fields(c) for c in configs), config_fields(tokenizer_config),
                   config_fields(processor_config),
                   controlnets=tuple((name, config_fields(c)) for name, c in controlnets), **options)

    @property
    def controlnet_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.controlnets)

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

    configs = [config(c) for c in (*spec.model_configs, *(fields for _, fields in spec.controlnets))]
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=dtype_for(spec, device), device=device, model_configs=configs,
        tokenizer_config=config(spec.tokenizer_config), processor_config=config(spec.processor_config),
    )  # fmt: skip
    check_family(spec, pipe)
    if spec.fp8:
        pipe.enable_fp8_computation()
    if spec.vram_limit is not None:
        pipe.enable_vram_management(vram_limit=spec.vram_limit)
    if spec.compile:
        pipe.compile()
    return pipe


def loaded_family(pipe) -> str:
    from ..pipeline21 import is_qwen21

    if is_qwen21(pipe.components):
        return QWEN21
    dit = pipe.components.dit
    return LAYERED if dit is not None and dit.config.use_layer3d_rope else QWEN_IMAGE


def check_family(spec: ModelSpec, pipe) -> None:
    """The loaded files are the family the spec names, and every named ControlNet was loaded."""
    found = loaded_family(pipe)
    if found != spec.family:
        raise ValueError(f"{spec.name} was served as a {family_name(spec.family)} model but its files are "
                         f"{family_name(found)}'s")
    if len(pipe.components.controlnets) != len(spec.controlnets):
        raise ValueError(f"{len(spec.controlnets)} ControlNet(s) were named ({', '.join(spec.controlnet_names)}) "
                         f"but {len(pipe.components.controlnets)} loaded")
