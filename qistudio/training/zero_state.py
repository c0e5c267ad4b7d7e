"""DeepSpeed ZeRO's optimizer state saved by parameter, so that a checkpoint resumes with any number of processes.

Design note. DeepSpeed's own state dicts hold each process's flat partition of whole parameter groups, which only as
many processes, under the same stage, can read back. Saved by parameter instead, each process's file holds, for every
trained parameter it holds a piece of, its contiguous slice of the flattened float32 master weights and of every
per-element optimizer state (AdamW's two moments), with where the slice starts; the scalar state (the step count) and
the param groups' settings beside. A run with any number of processes then reads, for each parameter, the slices
overlapping its own piece from the files of all processes that wrote them (through the safetensors memory map: no
process reads more than its share plus the pieces around it), and writes them into DeepSpeed's partitions.

Where a process's piece of a parameter lies depends on the stage, not the format (`_Zero3`, `_Zero12`):
- ZeRO-3 partitions every parameter on its own: process r holds elements [r*size, (r+1)*size) of each flattened
  parameter (size: its numel padded to a multiple of the processes, divided by them), and the model's own 16-bit
  partition is restored from the master weights (DeepSpeed's _rigid_load_state_dict does the same from its format).
- ZeRO-1/2 keep the parameters whole on every process and partition only the float32 master weights and the
  optimizer state: a group's parameters flattened one after another (bit16_groups_flat, aligned and padded), cut into
  as many equal ranges as processes (single_partition_of_fp32_groups). So process r holds one contiguous piece of the
  few parameters its range crosses (the first from first_offset on) and nothing of the others; DeepSpeed records it
  on each parameter it holds a piece of (`_hp_mapping`: where the piece starts in the parameter, and its view of the
  float32 partition). The whole parameters come from the checkpoint's weights file (loop.py), as without ZeRO.
Either way a piece is one range of the flattened parameter, so a checkpoint saved under ZeRO-1/2 resumes under
ZeRO-3 and back. DeepSpeed's bf16 optimizer (ZeRO-1 with float32 gradient accumulation) keeps its own partition
format (`by_parameter` is false: the checkpoint holds its shard, for as many processes).
"""

from __future__ import annotations

import json

import torch
import torch.nn as nn

MASTER = "fp32"  # the master weights' entry among a parameter's optimizer states


class _Zero3:
    """Where ZeRO-3 keeps this process's piece of each parameter."""

    def __init__(self, zero):
        self.zero, self.flats = zero, zero.fp32_partitioned_groups_flat

    def range(self, param) -> tuple[int, int]:
        """[start, end) of the flattened parameter that this process's partition holds (padding excluded; empty on
        a process whose partition is all padding)."""
        size = param.ds_tensor.ds_numel
        start = size * param.ds_zero_partition_rank if hasattr(param, "ds_zero_partition_rank") else 0
        return min(start, param.ds_numel), min(start + size, param.ds_numel)

    def view(self, param, key: str) -> torch.Tensor:
        """This process's piece of `param`'s master weights (key MASTER) or optimizer state `key`: a view."""
        start, end = self.range(param)
        view, _ = self.zero._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                          optim_state_key=None if key == MASTER else key)
        return view[: end - start]

    def restore_model(self, param, master: torch.Tensor) -> None:
        """The model's own partition (its only copy of the weights), in its dtype, from the master weights."""
        param.ds_tensor.data[: master.numel()].copy_(master)


class _Zero12:
    """Where ZeRO-1/2 keep this process's piece of each parameter (DeepSpeed's `_hp_mapping`, see above)."""

    def __init__(self, zero):
        self.zero, self.flats = zero, zero.single_partition_of_fp32_groups

    def range(self, param) -> tuple[int, int] | None:
        """[start, end) of the flattened parameter whose master weights this process holds; None if none."""
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return None
        start = mapping.lp_fragment_address.start
        return start, start + mapping.lp_fragment_address.numel

    def view(self, param, key: str) -> torch.Tensor:
        mapping = param._hp_mapping
        if key == MASTER:
            return mapping.hp_fragment
        flat = self.flats[mapping.param_group_index]
        where = mapping.hp_fragment_address
        return self.zero.optimizer.state[flat][key].narrow(0, where.start, where.numel)

    def restore_model(self, param, master: torch.Tensor) -> None:
        """Nothing: every process holds the whole parameter, read from the checkpoint's weights file."""


def _slices(optimizer) -> _Zero3 | _Zero12:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer
    if hasattr(inner, "fp32_partitioned_groups_flat"):
        return _Zero3(inner)
    if hasattr(inner, "single_partition_of_fp32_groups"):
        return _Zero12(inner)
    raise ValueError(f"the optimizer ({type(inner).__name__}) is not DeepSpeed's ZeRO-1/2 or ZeRO-3 optimizer, "
                     "whose state a checkpoint saved by parameter restores; resume under DeepSpeed ZeRO-1, 2 or 3")


def by_parameter(optimizer) -> bool:
    """Whether `optimizer` (as accelerate prepared it) is one whose state `state_by_parameter` saves."""
    try:
        _slices(optimizer)
    except ValueError:
        return False
    return True


def _state_keys(slices) -> tuple[list[str], dict, list[str]]:
    """(the optimizer's per-element state keys, its other state: the step count and such, which of those are
    tensors) of the first group; all empty before the optimizer's first step."""
    flat = slices.flats[0]
    state = slices.zero.optimizer.state.get(flat, {})
    per_element = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape]
    scalars = {k: (v.item() if torch.is_tensor(v) else v) for k, v in state.items() if k not in per_element}
    return per_element, scalars, [k for k in scalars if torch.is_tensor(state[k])]


def _create_states(slices, keys: list[str], scalars: dict) -> None:
    """Every group's optimizer state with the saved entries (a run resumed before its first step has none yet:
    torch's optimizers create them lazily, and take existing ones as they are). A number is kept as this optimizer
    keeps it, else as a float32 tensor, as torch's optimizers' load_state_dict makes their step counts (their step
    needs a tensor; DeepSpeed's CPU Adam, which counts in a Python int, takes one too)."""
    for flat in slices.flats:
        state = slices.zero.optimizer.state[flat]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(flat)
        for key, value in scalars.items():
            held = state.get(key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and (held is None or torch.is_tensor(held)):
                value = torch.tensor(value, dtype=held.dtype if held is not None else torch.float32)
            state[key] = value


def state_by_parameter(optimizer, parameters: dict[str, nn.Parameter]) -> dict:
    """This process's optimizer state by parameter (see above): a tree for checkpoint.py's writer."""
    slices = _slices(optimizer)
    keys, scalars, tensors = _state_keys(slices)
    pieces = {}
    for name, param in parameters.items():
        where = slices.range(param)
        if where is not None:
            pieces[name] = {"start": where[0], **{key: slices.view(param, key).detach().cpu().clone()
                                                  for key in (MASTER, *keys)}}
    groups = [{k: v for k, v in group.items() if k != "params"} for group in slices.zero.optimizer.param_groups]
    return {"format": "by_parameter", "keys": keys, "scalars": scalars, "tensor_scalars": tensors,
            "param_groups": groups, "parameters": pieces}


def load_state_by_parameter(optimizer, parameters: dict[str, nn.Parameter], files: list) -> None:
    """Restore what `state_by_parameter` saved, from the files of every process that saved it (any number, under
    any ZeRO stage)."""
    from safetensors import safe_open

    from .tree import TREE_KEY, unflatten

    slices = _slices(optimizer)
    opened = [safe_open(str(path), framework="pt", device="cpu") for path in files]
    # The trees, with each tensor left as its name in the file: only the overlapping slices are read.
    trees = [unflatten(json.loads(f.metadata()[TREE_KEY]), {k: k for k in f.keys()}, lambda name: False)
             for f in opened]
    saved = trees[0]
    keys = saved["keys"]
    ours = _state_keys(slices)[0]
    if ours and sorted(ours) != sorted(keys):
        raise ValueError(f"the saved optimizer state has {keys}, this run's optimizer {ours}")
    _create_states(slices, keys, saved["scalars"])
    with torch.no_grad():
        for name, param in parameters.items():
            where = slices.range(param)
            if where is None:
                continue
            for key in (MASTER, *keys):
                target = slices.view(param, key)
                _read_piece(target, where, name, key, trees, opened)
                if key == MASTER:
                    slices.restore_model(param, target)
        for group, settings in zip(slices.zero.optimizer.param_groups, saved["param_groups"]):
            group.update(settings)


def _read_piece(target: torch.Tensor, where: tuple[int, int], name: str, key: str, trees: list, opened: list) -> None:
    """Elements [start, end) of `name`'s state `key` into `target`, from the saved slices that overlap them; every
    element must be found (the saved processes' slices of a parameter never overlap)."""
    start, end = where
    found = 0
    for tree, file in zip(trees, opened):
        part = tree["parameters"].get(name)
        if part is None:
            continue
        low, high = max(start, part["start"]), min(end, part["start"] + _length(file, part[key]))
        if high > low:
            piece = file.get_slice(part[key])[low - part["start"]: high - part["start"]]
            target[low - start: high - start].copy_(piece)
            found += high - low
    if found != end - start:
        raise ValueError(f"the checkpoint's optimizer files hold {found} of the {end - start} elements "
                         f"[{start}, {end}) of {name}'s {key} this process needs (a file missing or of another run)")


def _length(file, name: str) -> int:
    return file.get_slice(name).get_shape()[0]
