"""FSDP2's state on disk: every process's shards of the DiT and its optimizer state for --resume (through
torch.distributed.checkpoint), and the trained DiT consolidated into one safetensors file.

Design note. The resume state is written with torch.distributed.checkpoint (DCP), the standard engine, which also
reshards on load: a checkpoint written by N processes resumes under M. DCP's default FileSystemWriter keeps its
plan in a pickled `.metadata` file that `dcp.load` unpickles (torch 2.14's FileSystemReader.read_metadata calls
an unpickler), so loading a checkpoint folder from elsewhere could run its author's code: the project promises no
pickle, and that reader is never used. torch's HuggingFaceStorageWriter / HuggingFaceStorageReader
(torch.distributed.checkpoint.hf_storage) write each process's shards as a safetensors file whose header holds,
as JSON, where each shard sits in its whole tensor, and read with safetensors' `get_slice`: nothing pickled is
written or read, a malformed file can only fail to load. The checkpoint's folder `sharded/` holds those files;
the optimizer's param_groups (learning rates, betas) and the LR schedule go into checkpoint.py's JSON tree files
as for one process.

The consolidated weights file (what a user loads) is written by the main process tensor by tensor: the header is
known from the shapes, then each tensor is gathered from all processes (`full_tensor`, a collective every process
joins in the same order) and appended, so no process holds more than one whole tensor. It is written to a
temporary file and renamed into place once complete. Its names are those of the released DiT
(outputs.exported_name), so our loader, diffusers' QwenImageTransformer2DModel and the seed's
`ModelConfig(path=...)` read it as they read the released checkpoint.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
import torch.nn as nn

from ..fileio import atomic_path
from ..weights.safetensors_io import SAFETENSORS_DTYPES

SHARDED = "sharded"  # the folder of a checkpoint that holds every process's shards
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """Write `model`'s and `optimizer`'s shards of this process into `folder` (every process calls it); returns
    the optimizer's param_groups (parameters named, not numbered), which the caller stores beside."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optimizer_state = get_optimizer_state_dict(model, optimizer)
    state = {"model": get_model_state_dict(model), "optimizer": optimizer_state["state"]}
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))
    return optimizer_state["param_groups"]


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, param_groups: list[dict]) -> None:
    """Restore `model` and `optimizer` from shards written by any number of processes (every process calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder}: no sharded state (the checkpoint was saved without FSDP, or is incomplete)")
    optimizer_state = get_optimizer_state_dict(model, optimizer)  # creates the state tensors to read into
    state = {"model": get_model_state_dict(model), "optimizer": optimizer_state["state"]}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, {"state": state["optimizer"], "param_groups": param_groups})


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor on every process (a collective), on the host."""
    if not hasattr(tensor, "full_tensor"):
        return tensor.detach().cpu()
    from torch.distributed.tensor import DTensor

    mesh = tensor.device_mesh
    local = tensor.to_local()
    if local.device.type != mesh.device_type:  # CPU-offloaded shards gathered over a GPU process group
        local = local.to(mesh.device_type)
    gathered = DTensor.from_local(local, mesh, tensor.placements, shape=tensor.shape, stride=tensor.stride())
    return gathered.full_tensor().detach().cpu()


def write_consolidated(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], writes: bool) -> Path:
    """Write `tensors` (name in the file -> a sharded or whole tensor) as one safetensors file at `path`. Every
    process calls it with the same names; the one with `writes` writes, atomically."""
    names = sorted(tensors)
    header, offset = {"__metadata__": metadata}, 0
    for name in names:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    if not writes:
        for name in names:
            _whole(tensors[name])
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in names:
            whole = _whole(tensors[name]).contiguous()
            file.write(whole.view(-1).view(torch.uint8).numpy().tobytes())
    return path
