"""Resuming a run from a checkpoint: whether it fits this run (state.json alone, before any model loads), then its
state put back into the loaded run.

Design note. The checks name what differs and what would fit (the settings in RESUME_KEYS, FSDP or not, the
optimizer state's engine (zero.py), samples per optimizer step, the dataset's length), since a checkpoint that
continues another data order or batch would train something else without saying so. The position in the epoch's
order is stored per process (items each process had taken); local_position turns it into this run's under another
number of processes. Files are read by checkpoint.py; this file decides only whether and how they apply.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .adapters import trainable_named_parameters
from .checkpoint import Progress, load_checkpoint, read_state, restore_rng
from .config import RESUME_KEYS, TrainConfig
from .sharded_checkpoint import load_sharded
from .zero import check_resumable as check_optimizer_engine
from .zero import is_zero3, load_optimizer_state

logger = logging.getLogger(__name__)


def check_resumable(path: Path, config: TrainConfig, accelerator, sharded: bool, dataset_length: int) -> None:
    """The checkpoint's settings, dataset length and process count against this run's (state.json only);
    `sharded`: this run shards the DiT with FSDP2."""
    state = read_state(path, accelerator.num_processes, accelerator.process_index)
    if bool(state.get("sharded")) != sharded:
        raise ValueError(f"cannot resume from {path}: it was saved {'with' if state.get('sharded') else 'without'}"
                         f" FSDP; resume {'with' if state.get('sharded') else 'without'} --fsdp (any number of "
                         "processes)")
    check_optimizer_engine(accelerator, state, path)  # the optimizer state across engines (zero.py)
    saved = state["config"]
    ours = json.loads(config.to_json())  # both as JSON has them (lists, not tuples)
    defaults = json.loads(TrainConfig(config.data).to_json())  # a setting older checkpoints did not record
    different = [k for k in RESUME_KEYS if saved.get(k, defaults[k]) != ours.get(k)]
    if different:
        shown = ", ".join(f"{k}: {saved.get(k)!r} there, {ours.get(k)!r} now" for k in different)
        raise ValueError(f"cannot resume from {path}: it was trained with other settings ({shown})")
    processes = accelerator.num_processes
    saved_batch = saved["gradient_accumulation_steps"] * state.get("world_size", 1)
    if saved_batch != config.gradient_accumulation_steps * processes:
        fix = (f"--gradient_accumulation_steps {saved_batch // processes}" if saved_batch % processes == 0 else
               f"a number of processes that divides {saved_batch}")
        raise ValueError(f"cannot resume from {path}: it trained {saved_batch} samples per optimizer step "
                         f"({state.get('world_size', 1)} process(es) x --gradient_accumulation_steps "
                         f"{saved['gradient_accumulation_steps']}); with {processes} process(es) use {fix}")
    if saved.get("dataset_length", dataset_length) != dataset_length:
        raise ValueError(f"cannot resume from {path}: the dataset had {saved['dataset_length']} samples (with "
                         f"repeat), now {dataset_length}; the data order would not continue")


def restore(path: Path, accelerator, trained_module: torch.nn.Module, dit: torch.nn.Module, optimizer,
            lr_scheduler) -> Progress:
    """The checkpoint's trained tensors, optimizer, LR-scheduler and random states into this run; returns its
    progress with the position as this run's processes count it."""
    loaded = load_checkpoint(path, accelerator.process_index, accelerator.num_processes)
    parameters = trainable_named_parameters(trained_module)
    if loaded.sharded is None and set(loaded.weights) != set(parameters):
        raise ValueError(f"cannot resume from {path}: its trainable tensors do not match this run's")
    try:
        if loaded.sharded is not None:  # FSDP2: every process reads its shards (sharded_checkpoint.py)
            load_sharded(loaded.sharded, dit, optimizer, loaded.optimizer_state["param_groups"])
        elif not is_zero3(accelerator):  # ZeRO-3's placeholders are restored by its optimizer state
            with torch.no_grad():
                for name, param in parameters.items():
                    param.copy_(loaded.weights[name])
        if loaded.sharded is None:
            load_optimizer_state(accelerator, optimizer, loaded.optimizer_state, parameters)
        lr_scheduler.load_state_dict(loaded.scheduler_state)
        if loaded.rng is not None:
            restore_rng(loaded.rng)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:  # well-formed files, wrong contents
        raise ValueError(f"cannot resume from {path}: its state does not fit this run ({type(e).__name__}: "
                         f"{e})") from None
    progress = loaded.progress
    progress.position = local_position(loaded.progress.position, loaded.world_size, accelerator.num_processes)
    logger.info("resumed from %s at step %d", path, progress.step)
    return progress


def local_position(position: int, saved_processes: int, processes: int) -> int:
    """A checkpoint's position (items each of its processes had taken) as this run's: the same place in the
    epoch's order under another number of processes (at most P - 1 items are taken twice)."""
    if saved_processes == processes:
        return position
    taken = position * saved_processes
    if taken % processes:
        logger.warning("resuming %d processes' checkpoint with %d: %d sample(s) of the epoch are trained again",
                       saved_processes, processes, taken % processes)
    return taken // processes
