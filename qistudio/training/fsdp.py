"""FSDP2 for full DiT training: the DiT built on the meta device, one fully_shard unit per block, and each process
reading only its shard of every weight from the memory-mapped files.

Design note. A 20B DiT in bf16 is 41 GB of weights, as much again of gradients and twice that of AdamW state: no
card holds it, and no process should even read all of it into host memory. So:
- Loading (training/models.py) gives the DiT's ModelConfig offload_device="disk": every block parameter stays an
  empty placeholder with its checkpoint key (memory/disk.DiskSource); `meta_blocks` turns the placeholders into
  meta tensors of their shapes. The few parameters outside the blocks (embeddings, the output layer: 0.2% of the
  model) are read as usual.
- `shard_dit`: `fully_shard` on each block (its parameters become DTensors sharded on dim 0 over the processes:
  rank r holds rows chunk r of torch.chunk), then on the DiT (the rest). The blocks are allocated for the local
  shard only (`to_empty`) and filled with their rows, read through the safetensors memory map (`get_slice`), so
  a process reads 1/N of the block bytes and never holds a whole tensor of a block (only FP8 or .pt checkpoints
  are read whole, one tensor at a time, to dequantise). Each shard is checked for NaN and infinity.
- Precision: parameters are stored in the run's dtype (bf16 on a GPU, as the one-process path), gradients are
  reduce-scattered in float32 (MixedPrecisionPolicy(reduce_dtype=float32)). On the CPU (tests) all is float32.
- Activation checkpointing is the DiT's own per-block checkpoint (gradient_checkpointing), which runs the block's
  FSDP all-gather again in the recompute. CPU offload (CPUOffloadPolicy) keeps shards, gradients and the optimizer
  step in host memory.
- Gradient accumulation reduce-scatters at every micro-batch (no_sync would keep whole gradients: the memory FSDP
  exists to save); the sharded gradients accumulate.
The optimizer sees DTensor parameters and needs nothing FSDP-specific. `--fsdp` turns this on under torchrun; an
accelerate config with `fsdp_version: 2` does too (its offload, activation-checkpointing and reshard settings are
read here; accelerate's own prepare, which would load the whole model on rank 0, is not used).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..memory.disk import DiskSource
from ..weights.build import read_weight
from ..weights.errors import CheckpointError
from ..weights.finite import is_finite
from ..weights.safetensors_io import SAFETENSORS_SUFFIXES, torch_dtype
from .config import TrainConfig


@dataclass(frozen=True)
class FSDPSettings:
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True


def settings(config: TrainConfig, accelerator) -> FSDPSettings | None:
    """FSDP2's settings from --fsdp or accelerate's FSDP plugin; None when the run does not shard the DiT."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        # `accelerate launch` with an FSDP config on the CPU sets FSDP_* in the environment but forms no plugin.
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
    if plugin is None:
        return FSDPSettings(cpu_offload=config.fsdp_cpu_offload) if config.fsdp else None
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError("the accelerate config asks for FSDP version 1; this trainer shards with FSDP2: set "
                         "fsdp_version: 2 (examples/model_training/full/accelerate_config_fsdp2.yaml)")
    if config.trainable_models != "dit":
        raise ValueError("an FSDP accelerate config shards the whole DiT (--trainable_models dit); train a LoRA "
                         "or a ControlNet with a plain multi-GPU config")
    from torch.distributed.fsdp import CPUOffloadPolicy

    offload = isinstance(plugin.cpu_offload, CPUOffloadPolicy)  # FSDP2's plugin holds a policy (fsdp_offload_params)
    return FSDPSettings(cpu_offload=offload or config.fsdp_cpu_offload,
                        activation_checkpointing=bool(plugin.activation_checkpointing),
                        reshard_after_forward=bool(plugin.reshard_after_forward))


def meta_blocks(dit: nn.Module, disk: DiskSource) -> None:
    """The blocks' empty placeholders (offload_device="disk") become meta tensors of their checkpoint shapes."""
    for name, (_, shape) in disk.deferred.items():
        module_name, _, param_name = name.rpartition(".")
        module = dit.get_submodule(module_name)
        placeholder = module._parameters[param_name]
        module._parameters[param_name] = nn.Parameter(torch.empty(shape, dtype=disk.dtype, device="meta"),
                                                      requires_grad=placeholder.requires_grad)


def shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the dim-0 rows rank `rank` holds: torch.chunk's split, as FSDP2's Shard(0)."""
    chunk = -(-rows // world)
    start = min(rows, rank * chunk)
    return start, min(rows, start + chunk)


def shard_dit(dit: nn.Module, disk: DiskSource, device: torch.device, fsdp: FSDPSettings) -> None:
    """Shard the DiT over all processes (a unit per block, then the rest) and fill each process's block shards
    from the files; the DiT's parameters are DTensors afterwards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    # The DiT's output is the output layer's (reshaped, so a view); the loss never changes it in place, which is
    # what FSDP2's warning about returned views is for.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    dtype = disk.dtype
    offload = fsdp.cpu_offload and device.type != "cpu"  # on the CPU everything is in host memory already
    options = dict(mesh=mesh, reshard_after_forward=fsdp.reshard_after_forward,
                   offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    if dtype != torch.float32:
        # Inputs pass as they come (cast_forward_inputs=False), as in the one-process run: FSDP's default would cast
        # every float input of a block to bf16, the float32 RoPE table included, which loses precision and, on a
        # GPU, made the checkpointed recompute (float32 table) disagree with the forward (bf16) it replays.
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                                    cast_forward_inputs=False)
    blocks = dit.transformer_blocks
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(dit, **options)
    if hasattr(dit, "joint"):  # Qwen-Image 2.1's training pass is a forward too: the root's weights gathered for it
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(dit, "joint")
    home = torch.device("cpu") if offload else device
    blocks.to_empty(device=home)
    _fill_shards(dit, disk, dist.get_rank(), dist.get_world_size())


def _fill_shards(dit: nn.Module, disk: DiskSource, rank: int, world: int) -> None:
    """Copy this process's rows of every block parameter from the checkpoint into its local shard."""
    bad, files = [], {}
    with torch.no_grad():
        for name, (key, shape) in disk.deferred.items():
            local = dit.get_parameter(name).to_local()
            start, end = shard_rows(shape[0], rank, world) if shape else (0, 0)
            if local.shape[0] != end - start:
                raise RuntimeError(f"{name}: FSDP2 gave rank {rank} {local.shape[0]} rows, expected {end - start}")
            if end > start:
                rows = _read_rows(disk, key, start, end, files)
                local.copy_(rows)
                if not is_finite(rows):
                    bad.append(disk.source.where(key))
    if bad:
        raise CheckpointError(f"{len(bad)} DiT weights hold NaN or infinity (first: {bad[0]}); the model would train "
                              "on NaN")


def _read_rows(disk: DiskSource, key: str, start: int, end: int, files: dict) -> torch.Tensor:
    """Rows [start, end) of a checkpoint tensor in the run's dtype: a slice of the memory map where the file is
    safetensors of a float type torch reads as is, else the whole tensor read (and dequantised) first. `files`
    keeps the opened safetensors files."""
    source = disk.source
    path = source.file_of[key]
    stored = torch_dtype(source.dtypes[key])
    if path.suffix in SAFETENSORS_SUFFIXES and stored is not None and stored.is_floating_point and stored.itemsize > 1:
        from safetensors import safe_open

        if path not in files:
            files[path] = safe_open(str(path), framework="pt", device="cpu")
        return files[path].get_slice(key)[start:end].to(disk.dtype)
    return read_weight(source, key, disk.dtype)[start:end]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly sharded) tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
