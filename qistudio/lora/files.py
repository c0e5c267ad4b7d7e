"""LoRA files in and out: a path, shard list, ModelConfig or state dict -> tensors; tensors -> a file, atomically."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..fileio import atomic_path
from ..weights.hub import resolve_files
from ..weights.model_config import ModelConfig
from ..weights.safetensors_io import SAFETENSORS_SUFFIXES, TensorSource

# diffusers writes the PEFT LoraConfig of a saved LoRA into the safetensors metadata under this key.
_DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


@dataclass
class LoRAFile:
    tensors: dict[str, torch.Tensor]
    peft_config: dict | None  # lora_alpha, alpha_pattern, use_rslora, ... when the file came with them
    description: str  # for messages
    default_name: str


def _paths(source) -> list[Path]:
    if isinstance(source, ModelConfig):
        return resolve_files(source)
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in SAFETENSORS_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: the folder holds no .safetensors LoRA file")
            files += found
        elif not path.exists():
            raise FileNotFoundError(f"{path}: no such LoRA file; give a .safetensors file, a folder or a ModelConfig")
        else:
            files.append(path)
    return files


def _peft_config(files: list[Path]) -> dict | None:
    """The adapter config saved with a LoRA: PEFT's adapter_config.json beside it, or diffusers' metadata."""
    first = files[0]
    beside = first.parent / "adapter_config.json"
    if first.name.startswith("adapter_model") and beside.exists():
        return json.loads(beside.read_text())
    if first.suffix not in SAFETENSORS_SUFFIXES:
        return None
    with safe_open(str(first), framework="pt", device="cpu") as handle:
        raw = (handle.metadata() or {}).get(_DIFFUSERS_METADATA_KEY)
    if not raw:
        return None
    # diffusers prefixes each field with its component ("transformer.lora_alpha"); our keys carry the prefix too.
    metadata = json.loads(raw)
    return {key.rpartition(".")[2] if key.startswith("transformer.") else key: v for key, v in metadata.items()}


def read_lora(source) -> LoRAFile:
    """Read a LoRA from a path, a folder, a list of shards, a ModelConfig or a state dict."""
    if isinstance(source, dict):
        tensors = {k: v for k, v in source.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise ValueError("the LoRA state dict holds no tensors")
        return LoRAFile(tensors, None, "the given state dict", "lora")
    if source is None or (isinstance(source, (list, tuple)) and not source):
        raise ValueError(f"no LoRA given ({source!r}); pass a .safetensors path, a ModelConfig or a state dict")
    files = _paths(source)
    reader = TensorSource(files)  # checks every header first: a truncated file fails here, naming it
    tensors = {name: reader.get(name) for name in reader.keys()}
    reader.close()
    description = ", ".join(str(f) for f in files)
    return LoRAFile(tensors, _peft_config(files), description, files[0].stem)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a safetensors file atomically: a temporary file in the same folder, renamed into place when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each tensor gets its own contiguous storage: safetensors refuses views that share memory.
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as temporary:
        save_file(owned, str(temporary), metadata=metadata)
    return path
