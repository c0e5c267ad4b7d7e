"""LoRA files in and out: a path, shard list, ModelConfig or state dict -> tensors; tensors -> a file, atomically.

Everything read is checked here, where the file is known, so each fault is one `LoRAError` naming the file and
the tensor: a corrupt or truncated file, bad JSON in adapter_config.json or in diffusers' metadata, an alpha that
is not a positive finite number, and NaN or infinity in any tensor (one aminmax pass per tensor; LoRAs are small).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..fileio import atomic_path
from ..weights.errors import CheckpointError
from ..weights.finite import FiniteCheck
from ..weights.hub import resolve_files
from ..weights.jsonfile import describe_type, parse_json, read_json
from ..weights.model_config import ModelConfig
from ..weights.safetensors_io import SAFETENSORS_SUFFIXES, TensorSource
from .errors import LoRAError

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
    if not isinstance(source, (str, os.PathLike, list, tuple)):
        raise LoRAError(f"a LoRA is a path, a folder, a list of shards, a ModelConfig or a state dict; got "
                        f"{type(source).__name__}")
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


def _number(value, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LoRAError(f"{where}: {what} is {value!r}; an alpha must be a positive finite number")
    return float(value)


def check_peft_config(config: dict, where: str) -> dict:
    """The fields of a PEFT adapter config that scale a LoRA, checked: alphas are positive finite numbers."""
    if "lora_alpha" in config:
        config["lora_alpha"] = _number(config["lora_alpha"], where, "lora_alpha")
    patterns = config.get("alpha_pattern")
    if patterns is not None:
        if not isinstance(patterns, dict):
            raise LoRAError(f"{where}: alpha_pattern is {describe_type(patterns)}; expected an object "
                            "(layer pattern -> alpha)")
        config["alpha_pattern"] = {str(k): _number(v, where, f"alpha_pattern[{k!r}]") for k, v in patterns.items()}
    if not isinstance(config.get("use_rslora", False), bool):
        raise LoRAError(f"{where}: use_rslora is {config['use_rslora']!r}; expected true or false")
    return config


def _peft_config(files: list[Path], metadata: dict[str, str]) -> dict | None:
    """The adapter config saved with a LoRA: PEFT's adapter_config.json beside it, or diffusers' metadata."""
    first = files[0]
    beside = first.parent / "adapter_config.json"
    if first.name.startswith("adapter_model") and beside.exists():
        return check_peft_config(read_json(beside, LoRAError), str(beside))
    raw = metadata.get(_DIFFUSERS_METADATA_KEY)
    if not raw:
        return None
    where = f"{first} (metadata {_DIFFUSERS_METADATA_KEY})"
    # diffusers prefixes each field with its component ("transformer.lora_alpha"); our keys carry the prefix too.
    metadata = parse_json(raw, where, LoRAError)
    config = {key.rpartition(".")[2] if key.startswith("transformer.") else key: v for key, v in metadata.items()}
    return check_peft_config(config, where)


def _state_dict_tensors(source: dict) -> dict[str, torch.Tensor]:
    """A state dict's tensors; a plain number is accepted for an `.alpha`, anything else that is no tensor is not."""
    tensors = {}
    for key, value in source.items():
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
        elif str(key).endswith(".alpha"):
            tensors[str(key)] = torch.tensor(_number(value, "the given LoRA state dict", f"{key!r}"))
        else:
            raise LoRAError(f"the given LoRA state dict holds a {type(value).__name__} under {key!r}, not a tensor")
    if not tensors:
        raise LoRAError("the LoRA state dict holds no tensors")
    return tensors


def check_tensors(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor of a LoRA finite; its alphas single numbers (any float or integer), its weights floats."""
    check = FiniteCheck()
    for key, tensor in tensors.items():
        if key.endswith(".alpha"):
            if tensor.numel() != 1 or tensor.dtype == torch.bool or tensor.is_complex():
                raise LoRAError(f"{where}: {key} is {tensor.dtype} {list(tensor.shape)}; an alpha is one number")
        check.add(key, tensor)
    bad = check.failures()
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise LoRAError(f"{where}: tensor{'s' if len(bad) > 1 else ''} {shown} hold{'' if len(bad) > 1 else 's'} "
                        "NaN or infinity")


def read_lora(source) -> LoRAFile:
    """Read a LoRA from a path, a folder, a list of shards, a ModelConfig or a state dict."""
    if isinstance(source, dict):
        tensors = _state_dict_tensors(source)
        check_tensors(tensors, "the given LoRA state dict")
        return LoRAFile(tensors, None, "the given state dict", "lora")
    if source is None or (isinstance(source, (list, tuple)) and not source):
        raise ValueError(f"no LoRA given ({source!r}); pass a .safetensors path, a ModelConfig or a state dict")
    files = _paths(source)
    description = ", ".join(str(f) for f in files)
    try:
        reader = TensorSource(files)  # checks every header first: a truncated file fails here, naming it
        tensors = {name: reader.get(name) for name in reader.keys()}
    except CheckpointError as e:
        raise LoRAError(str(e)) from None
    metadata = reader.metadata.get(files[0], {})
    reader.close()
    for path in files:
        check_tensors({name: t for name, t in tensors.items() if reader.file_of[name] == path}, str(path))
    return LoRAFile(tensors, _peft_config(files, metadata), description, files[0].stem)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a safetensors file atomically: a temporary file in the same folder, renamed into place when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each tensor gets its own contiguous storage: safetensors refuses views that share memory.
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as temporary:
        save_file(owned, str(temporary), metadata=metadata)
    return path
