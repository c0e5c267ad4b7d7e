"""ZeRO-3: the DiT built on the meta device and each process reading only its partition of every block weight.

Design note. Under ZeRO-3, accelerate's prepare would partition a DiT every process holds whole (DeepSpeed
broadcasts each tensor from process 0, then keeps this process's part): 41 GB of host memory per process for the 20B
model. Instead the DiT is loaded as for FSDP2 (training/models.py: the block weights left in the memory-mapped
files, their parameters meta tensors; 0.2% of the model outside the blocks read as usual), and `partition_dit` makes
each block parameter a DeepSpeed ZeRO-3 parameter itself, with DeepSpeed's own bookkeeping (zero.Init's
`_convert_to_deepspeed_param`, its partition sizes and ranks), allocating only this process's partition and filling
it from the files: ZeRO-3 partitions the flattened tensor, padded to a multiple of the processes, into equal
contiguous ranges, so process r reads the rows that hold elements [r*size, (r+1)*size) (whole rows: at most two rows
more than its share) through the safetensors memory map. DeepSpeed's initialize then finds these parameters
partitioned already and converts only the rest (zero_params[0].convert_to_zero_parameters: the same Init). Its
parameters are in DeepSpeed's compute dtype (a ZeRO-Init model is not cast by the engine).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..memory.disk import DiskSource
from ..weights.errors import CheckpointError
from ..weights.finite import is_finite

logger = logging.getLogger(__name__)


def _deepspeed_config(accelerator) -> dict:
    return accelerator.state.deepspeed_plugin.deepspeed_config


def parameter_dtype(accelerator) -> torch.dtype:
    """The dtype DeepSpeed keeps the model's parameters in (its fp16 / bf16 setting, else float32)."""
    config = _deepspeed_config(accelerator)
    precision = accelerator.mixed_precision
    if precision == "bf16" or config.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if precision == "fp16" or config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


@dataclass(frozen=True)
class PartitionReport:
    """What one process allocated and read for the DiT's blocks, in elements."""

    block_elements: int  # of all block parameters, whole
    allocated: int  # this process's partitions (padding included)
    read: int  # read from the files (whole rows: a little more than `allocated` when rows straddle a partition)


def partition_dit(accelerator, dit: nn.Module, disk: DiskSource) -> PartitionReport:
    """The DiT's meta block parameters become ZeRO-3 partitioned parameters, each process reading only its
    partition from the files; the DiT's other parameters are cast to DeepSpeed's parameter dtype."""
    init = _zero_init(accelerator)
    dtype = parameter_dtype(accelerator)
    for name, param in dit.named_parameters():
        if name not in disk.deferred and param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)
    total = allocated = read = 0
    bad, files = [], {}
    for name, (key, shape) in disk.deferred.items():
        module_name, _, param_name = name.rpartition(".")
        module = dit.get_submodule(module_name)
        param = _partitioned_parameter(init, module._parameters[param_name], dtype)
        size = param.ds_tensor.ds_numel
        start = size * init._partition_rank(param)
        values, elements_read = _read_range(disk, key, shape, start, start + size, files)
        with torch.no_grad():
            param.ds_tensor.zero_()
            param.ds_tensor[: values.numel()].copy_(values)
        if not is_finite(values):
            bad.append(disk.source.where(key))
        param.partition()  # its partition is set: DeepSpeed only frees the (empty) whole tensor
        module._parameters[param_name] = param
        total += shape.numel()
        allocated += param.ds_tensor.numel()
        read += elements_read
    if bad:
        raise CheckpointError(f"{len(bad)} DiT weights hold NaN or infinity (first: {bad[0]}); the model would train "
                              "on NaN")
    report = PartitionReport(total, allocated, read)
    logger.info("ZeRO-3: process %d allocated %d and read %d of the DiT blocks' %d weight elements (its partition)",
                accelerator.process_index, report.allocated, report.read, report.block_elements)
    return report


def _zero_init(accelerator):
    """DeepSpeed's zero.Init for this run's config (not entered: its bookkeeping only), the one DeepSpeed's
    initialize then converts the DiT's other parameters with."""
    import deepspeed

    # Settings left "auto" are filled in by accelerate's prepare (from the model, later); DeepSpeed's config parser
    # wants numbers, and the partitioning needs none of them (its defaults stand in), but the batch sizes.
    config = _without_auto(_deepspeed_config(accelerator))
    processes = accelerator.num_processes
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=processes)
    init = deepspeed.zero.Init(config_dict_or_path=config, dtype=parameter_dtype(accelerator))
    if str(init.remote_device) == "nvme":
        raise ValueError("the DeepSpeed config offloads parameters to NVMe; this trainer partitions the DiT into "
                         "device or host memory: use offload_param_device cpu or none")
    return init


def _without_auto(config: dict) -> dict:
    """A copy of a DeepSpeed config without its "auto" settings (at any depth)."""
    return {key: _without_auto(value) if isinstance(value, dict) else value
            for key, value in config.items() if value != "auto"}


def _partitioned_parameter(init, meta: nn.Parameter, dtype: torch.dtype) -> nn.Parameter:
    """A ZeRO-3 parameter of `meta`'s shape whose partition (zeros) is allocated, nothing else: the same
    attributes DeepSpeed's own partitioning sets (partition_parameters.Init._partition_param)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    # A stand-in of the right shape over one element: DeepSpeed records the shape, then frees it.
    param = nn.Parameter(torch.zeros((), dtype=dtype, device=init.local_device).expand(meta.shape),
                         requires_grad=meta.requires_grad)
    init._convert_to_deepspeed_param(param)
    aligned = init._aligned_size(param)
    size = aligned // init._partition_world_size(param)
    device = init.local_device if param.ds_persist else init.remote_device
    partition = torch.zeros(size, dtype=dtype, device=device)
    if str(device) == "cpu" and init.pin_memory:
        partition = get_accelerator().pin_memory(partition)
    partition.requires_grad = False
    param.ds_tensor = partition
    partition.ds_numel = size
    partition.status = PartitionedParamStatus.AVAILABLE
    partition.final_location = None
    param.ds_numel_aligned = aligned
    return param


def _read_range(disk: DiskSource, key: str, shape: torch.Size, start: int, end: int,
                files: dict) -> tuple[torch.Tensor, int]:
    """(elements [start, end) of the flattened checkpoint tensor, clipped to its size, in the loader's dtype;
    the elements read to get them): whole rows through the memory map (fsdp._read_rows)."""
    from ..weights.build import read_weight
    from .fsdp import _read_rows

    numel = shape.numel()
    end = min(end, numel)
    if end <= start:
        return torch.empty(0, dtype=disk.dtype), 0
    if len(shape) == 0:
        return read_weight(disk.source, key, disk.dtype).reshape(1), 1
    row = numel // shape[0]
    first, last = start // row, -(-end // row)
    rows = _read_rows(disk, key, first, last, files).reshape(-1)
    return rows[start - first * row: end - first * row], rows.numel()
