"""The files a run leaves for users: trained weights as safetensors (atomic), each carrying the training config.

LoRA files (`lora_format`):
  diffusers  `transformer.<module>.lora_A.weight` / `.lora_B.weight`, alpha folded into B: what diffusers'
             `QwenImagePipeline.load_lora_weights`, ComfyUI (which maps `transformer.` keys for Qwen-Image) and
             our `pipe.load_lora` load as they are. The default.
  diffsynth  `<module>.lora_A.default.weight` / `.lora_B.default.weight`: the reference trainer's own layout.
Both go through qistudio.lora's converter, the same code `qistudio convert-lora` runs.

Full DiT files hold every DiT tensor under `pipe.dit.<name>` less `remove_prefix_in_ckpt` (the seed's option; its
default "pipe.dit." leaves the plain names `pipe.dit.load_state_dict` and our loader take). A trained Blockwise
ControlNet is saved under `pipe.blockwise_controlnet.models.0.<name>` less the prefix: with the seed's
"pipe.blockwise_controlnet.models.0." the released ControlNet file's names, loadable with ModelConfig(path=...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .. import fileio
from ..lora import convert_lora_state_dict
from ..lora.files import write_safetensors
from .adapters import lora_state_dict
from .config import TRAINABLE_MODELS, TrainConfig

CONFIG_FILE = "training_config.json"


def write_text_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return fileio.write_text_atomic(path, text)


def write_config(config: TrainConfig, output_path: str | os.PathLike) -> Path:
    return write_text_atomic(Path(output_path) / CONFIG_FILE, config.to_json() + "\n")


def exported_state_dict(trained: nn.Module, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The trained tensors of `trained` (the DiT with its LoRA, the whole DiT or the ControlNet) in the file layout
    the config asks for."""
    if config.is_lora:
        return convert_lora_state_dict(lora_state_dict(trained), config.lora_format)
    return {exported_name(name, config): tensor for name, tensor in trained.state_dict().items()}


def exported_name(name: str, config: TrainConfig) -> str:
    """A fully trained module's tensor name in the saved file: its name in the reference's training module (the
    module's prefix + `name`) less remove_prefix_in_ckpt."""
    prefix = config.remove_prefix_in_ckpt or ""
    key = TRAINABLE_MODELS[config.trainable_models] + name
    return key[len(prefix):] if prefix and key.startswith(prefix) else key


def weights_metadata(config: TrainConfig, step: int) -> dict[str, str]:
    """The header metadata of a saved weights file: the config and the step it was saved at."""
    metadata = {"format": "pt", "qistudio_training_config": json.dumps(config.to_dict()),
                "qistudio_training_step": str(step)}
    if config.is_lora:
        metadata["qistudio_lora_format"] = config.lora_format
    return metadata


def save_weights(trained: nn.Module, config: TrainConfig, file_name: str, step: int) -> Path:
    """Write `output_path/file_name` atomically; its metadata holds the config and the step it was saved at."""
    path = Path(config.output_path) / file_name
    return write_safetensors(exported_state_dict(trained, config), path, weights_metadata(config, step))
