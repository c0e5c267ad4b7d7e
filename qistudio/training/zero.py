"""What DeepSpeed (ZeRO, through accelerate) changes for the trainer: one sample per step, who decides when the
optimizer steps, and saving weights that ZeRO-3 has partitioned.

Design note. The trainer hands accelerate no DataLoader, so the DeepSpeed config's micro-batch size ("auto" in
the shipped configs) is set to the trainer's one sample per process here. Gradient accumulation stays the
trainer's own (loss / K, boundaries it chooses): under DeepSpeed the optimizer steps inside
`accelerator.backward` whenever accelerate's sync flag is set, so `set_boundary` sets that flag per micro-batch,
and DeepSpeed's own accumulation count must stay 1 (else it would divide the loss again).

Saving under ZeRO-3: each process holds a shard of every parameter and a module's own `.data` is an empty
placeholder. accelerate's `get_state_dict` gathers the tensors (every process must call it: a collective; the
main process gets them in 16 bit, layer by layer into host memory, as the reference saves). The writers
(outputs.save_weights, the resume checkpoint) read modules, so on the main process `holding` puts the gathered
tensors in the placeholders' place while they write, and the placeholders back afterwards. Without ZeRO-3
`get_state_dict` is the module's own state dict and nothing needs swapping.

Loading under ZeRO-3 (full DiT training). accelerate's prepare would partition a DiT every process holds whole
(DeepSpeed broadcasts each tensor from process 0, then keeps this process's part): 41 GB of host memory per process
for the 20B model. Instead the DiT is loaded as for FSDP2 (training/models.py: the block weights left in the
memory-mapped files, their parameters meta tensors; 0.2% of the model outside the blocks read as usual), and
`partition_dit` makes each block parameter a DeepSpeed ZeRO-3 parameter itself, with DeepSpeed's own bookkeeping
(zero.Init's `_convert_to_deepspeed_param`, its partition sizes and ranks), allocating only this process's partition
and filling it from the files: ZeRO-3 partitions the flattened tensor, padded to a multiple of the processes,
into equal contiguous ranges, so process r reads the rows that hold elements [r*size, (r+1)*size) (at most one
row more than its share) through the safetensors memory map. DeepSpeed's initialize then finds these parameters
partitioned already and converts only the rest (zero_params[0].convert_to_zero_parameters: the same Init). Its
parameters are in DeepSpeed's compute dtype (a ZeRO-Init model is not cast by the engine).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..memory.disk import DiskSource
from ..weights.errors import CheckpointError
from ..weights.finite import is_finite
from .checkpoint import BY_PARAMETER, BY_PARAMETER_FILES

logger = logging.getLogger(__name__)


def deepspeed_plugin(accelerator):
    return getattr(accelerator.state, "deepspeed_plugin", None)


def is_zero3(accelerator) -> bool:
    plugin = deepspeed_plugin(accelerator)
    return plugin is not None and plugin.zero_stage == 3


def prepare_deepspeed(accelerator) -> None:
    """Before accelerator.prepare: one sample per micro-batch, no clipping and no accumulation of DeepSpeed's own."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") in ("auto", 1):
        config["train_micro_batch_size_per_gpu"] = 1
    else:
        raise ValueError(f"the DeepSpeed config sets train_micro_batch_size_per_gpu to "
                         f"{config['train_micro_batch_size_per_gpu']}; this trainer takes one sample per process and "
                         "step (as the reference): set it to 1 or auto, and use --gradient_accumulation_steps")
    if config.get("gradient_clipping") == "auto":
        config["gradient_clipping"] = 0.0  # accelerate would fill in 1.0; the trainer does not clip, with or without
    if config.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise ValueError(f"the DeepSpeed config sets gradient_accumulation_steps to "
                         f"{config['gradient_accumulation_steps']}; set it to 1 or auto and give "
                         "--gradient_accumulation_steps instead (the trainer accumulates by itself)")


@contextlib.contextmanager
def loading(accelerator):
    """The context to load the models in. Under a ZeRO-3 config accelerate registers it with transformers, which
    then builds any transformers model partitioned (deepspeed.zero.Init, whatever zero3_init_flag says): the text
    encoder, which our loader fills from meta tensors and which every process runs whole, frozen, must not be.
    So transformers is shown no DeepSpeed config while the models load; the DiT is partitioned by
    accelerate.prepare afterwards."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def set_boundary(accelerator, boundary: bool) -> None:
    """Tell DeepSpeed whether this micro-batch ends an optimizer step (a no-op without DeepSpeed)."""
    if deepspeed_plugin(accelerator) is not None:
        accelerator.gradient_state._set_sync_gradients(boundary)


def load_optimizer_state(accelerator, optimizer, state: dict, parameters: dict[str, nn.Parameter]) -> None:
    """`optimizer.load_state_dict(state)` for a state this process saved. A DeepSpeed ZeRO optimizer (inside
    accelerate's wrapper) takes a list indexed by data-parallel rank, from which each process reads its own, and is
    told to restore its float32 master weights from the saved ones (else it rebuilds them from the 16-bit model
    weights: not an exact resume; under ZeRO-3 they are also what restores the partitioned model weights). A state
    saved by parameter (checkpoint.py hands the files of every process that wrote it) is read by
    `load_state_by_parameter`, whatever the number of processes then and now."""
    if isinstance(state, dict) and BY_PARAMETER_FILES in state:
        load_state_by_parameter(optimizer, parameters, state[BY_PARAMETER_FILES])
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    if deepspeed_plugin(accelerator) is None or not _is_zero_optimizer(inner):
        optimizer.load_state_dict(state)
        return
    inner.load_state_dict([state] * accelerator.num_processes, load_from_fp32_weights=True)


def _is_zero_optimizer(optimizer) -> bool:
    try:  # the base of DeepSpeed's ZeRO stage 1-3 and bf16 optimizers (exported from deepspeed.runtime before 0.19)
        from deepspeed.runtime.base_optimizer import ZeROOptimizer
    except ImportError:
        from deepspeed.runtime import ZeROOptimizer

    return isinstance(optimizer, ZeROOptimizer)


def gathered_state(accelerator, model: torch.nn.Module, trained: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of `trained` (a submodule of the prepared `model`, or the model itself) under its own names;
    call on every process. Under ZeRO-3 only the main process gets them (the others get an empty dict)."""
    state = accelerator.get_state_dict(model) or {}
    unwrapped = accelerator.unwrap_model(model)
    prefix = next((name for name, module in unwrapped.named_modules() if module is trained), None)
    if prefix is None:
        raise ValueError("the trained module is not part of the prepared model")
    prefix = f"{prefix}." if prefix else ""
    return {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}


@contextlib.contextmanager
def holding(module: torch.nn.Module, state: dict[str, torch.Tensor]):
    """`module`'s parameters and buffers named in `state` hold those tensors for the duration."""
    placeholders = []
    try:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name in state:
                placeholders.append((tensor, tensor.data))
                tensor.data = state[name]  # in host memory: the writers copy there anyway
        yield
    finally:
        for tensor, data in placeholders:
            tensor.data = data


def partitions_on_load(accelerator, trainable_models: str) -> bool:
    """Whether the DiT is loaded partitioned (ZeRO-3 training the whole DiT; see the design note)."""
    return is_zero3(accelerator) and trainable_models == "dit"


def parameter_dtype(accelerator) -> torch.dtype:
    """The dtype DeepSpeed keeps the model's parameters in (its fp16 / bf16 setting, else float32)."""
    config = deepspeed_plugin(accelerator).deepspeed_config
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
    config = _without_auto(deepspeed_plugin(accelerator).deepspeed_config)
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


# -- the optimizer state by parameter (ZeRO-3) -------------------------------------------------------------------------
# DeepSpeed's own ZeRO-3 state dict holds each process's flat partition of whole parameter groups, which only as many
# processes can read back. Saved by parameter instead, each process's file holds, for every trained parameter, its
# contiguous slice of the flattened float32 master weights and of every per-element optimizer state (AdamW's two
# moments), with where the slice starts; the scalar state (the step count) and the param groups' settings beside.
# A run with any number of processes then reads, for each parameter, the slices overlapping its own partition from
# the files of all processes that wrote them (through the safetensors memory map: no process reads more than its
# share plus the pieces around it), and writes them into DeepSpeed's partitions: the master weights, the moments, and
# the model's own 16-bit partition (DeepSpeed's _rigid_load_state_dict does the same from its own format).
MASTER = "fp32"  # the master weights' entry among a parameter's optimizer states


def partitioned_optimizer(accelerator) -> bool | str:
    """How the checkpoints hold the optimizer state (CheckpointWriter.partitioned_optimizer): by parameter under
    ZeRO-3 (resumable with any number of processes), each process's own DeepSpeed shard under ZeRO-1/2, else whole."""
    return BY_PARAMETER if is_zero3(accelerator) else deepspeed_plugin(accelerator) is not None


def optimizer_state(accelerator, optimizer, parameters: dict[str, nn.Parameter]) -> dict:
    """What the checkpoint keeps of the optimizer (every process calls it): by parameter under ZeRO-3."""
    if is_zero3(accelerator):
        return state_by_parameter(optimizer, parameters)
    return optimizer.state_dict()


def _zero3_optimizer(optimizer):
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> DeepSpeed's ZeRO-3 optimizer
    if not hasattr(inner, "fp32_partitioned_groups_flat"):
        raise ValueError("the optimizer is not DeepSpeed's ZeRO-3 optimizer")
    return inner


def _partition(zero, param, key: str):
    """This process's partition of `param`'s master weights (key MASTER) or optimizer state `key`: a view."""
    view, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                 optim_state_key=None if key == MASTER else key)
    return view


def _state_keys(zero) -> tuple[list[str], dict, list[str]]:
    """(the optimizer's per-element state keys, its other state: the step count and such, which of those are
    tensors) of the first group; all empty before the optimizer's first step."""
    flat = zero.fp32_partitioned_groups_flat[0]
    state = zero.optimizer.state.get(flat, {})
    per_element = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape]
    scalars = {k: (v.item() if torch.is_tensor(v) else v) for k, v in state.items() if k not in per_element}
    return per_element, scalars, [k for k in scalars if torch.is_tensor(state[k])]


def _create_states(zero, keys: list[str], scalars: dict, tensors: list[str]) -> None:
    """Every group's optimizer state with the saved entries (a run resumed before its first step has none yet:
    torch's optimizers create them lazily, and take existing ones as they are)."""
    for flat in zero.fp32_partitioned_groups_flat:
        state = zero.optimizer.state[flat]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(flat)
        for key, value in scalars.items():
            dtype = state[key].dtype if torch.is_tensor(state.get(key)) else torch.float32
            state[key] = torch.tensor(value, dtype=dtype) if key in tensors else value


def _range(param) -> tuple[int, int]:
    """[start, end) of the flattened parameter that this process's partition holds (padding excluded)."""
    size = param.ds_tensor.ds_numel
    start = size * param.ds_zero_partition_rank if hasattr(param, "ds_zero_partition_rank") else 0
    return min(start, param.ds_numel), min(start + size, param.ds_numel)


def state_by_parameter(optimizer, parameters: dict[str, nn.Parameter]) -> dict:
    """This process's optimizer state by parameter (see above): a tree for checkpoint.py's writer."""
    zero = _zero3_optimizer(optimizer)
    keys, scalars, tensors = _state_keys(zero)
    slices = {}
    for name, param in parameters.items():
        start, end = _range(param)
        slices[name] = {"start": start, **{key: _partition(zero, param, key)[: end - start].detach().cpu().clone()
                                           for key in (MASTER, *keys)}}
    groups = [{k: v for k, v in group.items() if k != "params"} for group in zero.optimizer.param_groups]
    return {"format": "by_parameter", "keys": keys, "scalars": scalars, "tensor_scalars": tensors,
            "param_groups": groups, "parameters": slices}


def load_state_by_parameter(optimizer, parameters: dict[str, nn.Parameter], files: list) -> None:
    """Restore what `state_by_parameter` saved, from the files of every process that saved it (any number)."""
    from safetensors import safe_open

    from .tree import TREE_KEY, unflatten

    zero = _zero3_optimizer(optimizer)
    opened = [safe_open(str(path), framework="pt", device="cpu") for path in files]
    # The trees, with each tensor left as its name in the file: only the overlapping slices are read.
    trees = [unflatten(json.loads(f.metadata()[TREE_KEY]), {k: k for k in f.keys()}, lambda name: False)
             for f in opened]
    saved = trees[0]
    keys = saved["keys"]
    ours = _state_keys(zero)[0]
    if ours and ours != keys:
        raise ValueError(f"the saved optimizer state has {keys}, this run's optimizer {ours}")
    _create_states(zero, keys, saved["scalars"], saved["tensor_scalars"])
    with torch.no_grad():
        for name, param in parameters.items():
            start, end = _range(param)
            for key in (MASTER, *keys):
                target = _partition(zero, param, key)
                target.zero_()
                for tree, file in zip(trees, opened):
                    part = tree["parameters"][name]
                    low, high = max(start, part["start"]), min(end, part["start"] + _length(file, part[key]))
                    if high > low:
                        piece = file.get_slice(part[key])[low - part["start"]: high - part["start"]]
                        target[low - start: high - start].copy_(piece)
                if key == MASTER:  # the model's own partition, in its dtype, from the master weights
                    param.ds_tensor.data.copy_(target)
        for group, settings in zip(zero.optimizer.param_groups, saved["param_groups"]):
            group.update(settings)


def _length(file, name: str) -> int:
    return file.get_slice(name).get_shape()[0]
