"""ZeRO-3's optimizer state saved by parameter, so that a checkpoint resumes with any number of processes.

Design note. DeepSpeed's own ZeRO-3 state dict holds each process's flat partition of whole parameter groups, which
only as many processes can read back. Saved by parameter instead, each process's file holds, for every trained
parameter, its contiguous slice of the flattened float32 master weights and of every per-element optimizer state
(AdamW's two moments), with where the slice starts; the scalar state (the step count) and the param groups' settings
beside. A run with any number of processes then reads, for each parameter, the slices overlapping its own partition
from the files of all processes that wrote them (through the safetensors memory map: no process reads more than its
share plus the pieces around it), and writes them into DeepSpeed's partitions: the master weights, the moments, and
the model's own 16-bit partition (DeepSpeed's _rigid_load_state_dict does the same from its own format).
"""

from __future__ import annotations

import json

import torch
import torch.nn as nn

MASTER = "fp32"  # the master weights' entry among a parameter's optimizer states


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
