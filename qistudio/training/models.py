"""The seed's model arguments -> ModelConfigs -> loaded components, with the frozen models set up for training."""

from __future__ import annotations

import torch

from ..components import Components, load_components
from ..weights.model_config import ModelConfig
from .config import TrainConfig

DEFAULT_TOKENIZER = ("Qwen/Qwen-Image", "tokenizer/")
DEFAULT_PROCESSOR = ("Qwen/Qwen-Image-Edit", "processor/")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def hub_config(spec: str) -> ModelConfig:
    """'model_id:origin_file_pattern' (the seed's --model_id_with_origin_paths entry) -> ModelConfig."""
    model_id, sep, pattern = spec.partition(":")
    if not sep or not model_id or not pattern:
        raise ValueError(f"expected MODEL_ID:FILE_PATTERN such as Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors,"
                         f" got {spec!r}")
    return ModelConfig(model_id=model_id, origin_file_pattern=pattern)


def model_configs(config: TrainConfig) -> tuple[list[ModelConfig], ModelConfig, ModelConfig | None]:
    """(model configs, tokenizer config, processor config or None) as the seed's train.py builds them."""
    configs = [ModelConfig(path=list(p) if isinstance(p, (list, tuple)) else str(p)) for p in config.model_paths]
    configs += [hub_config(spec) for spec in config.model_id_with_origin_paths]
    tokenizer = (ModelConfig(path=config.tokenizer_path) if config.tokenizer_path
                 else ModelConfig(model_id=DEFAULT_TOKENIZER[0], origin_file_pattern=DEFAULT_TOKENIZER[1]))
    processor = None
    if "edit_image" in config.extra_inputs:
        processor = (ModelConfig(path=config.processor_path) if config.processor_path
                     else ModelConfig(model_id=DEFAULT_PROCESSOR[0], origin_file_pattern=DEFAULT_PROCESSOR[1]))
    return configs, tokenizer, processor


def compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.dtype is not None:
        return DTYPES[config.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_training_components(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> Components:
    configs, tokenizer, processor = model_configs(config)
    components = load_components(configs, tokenizer, processor, dtype, device)
    prepare_frozen(components)
    return components


def prepare_frozen(components: Components) -> None:
    """The DiT, VAE and text encoder must all be there; the VAE and text encoder only encode, without gradients."""
    components.require("dit", "vae", "text_encoder")
    for model in (components.vae, components.text_encoder):
        model.requires_grad_(False)
        model.eval()
