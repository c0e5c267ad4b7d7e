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

Under ZeRO-3 a full DiT fine-tune loads its DiT partitioned (zero_load.py). Under ZeRO-1, 2 and 3 the checkpoints
hold the optimizer state by parameter, resumable with any number of processes and under any of those stages
(zero_state.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .checkpoint import BY_PARAMETER, BY_PARAMETER_FILES
from .zero_load import partition_dit  # noqa: F401  (the loop's entry point)
from .zero_state import by_parameter, load_state_by_parameter, state_by_parameter


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


def partitioned_optimizer(accelerator, optimizer) -> bool | str:
    """How the checkpoints hold the prepared `optimizer`'s state (CheckpointWriter.partitioned_optimizer): by
    parameter under ZeRO-1, 2 and 3 (resumable with any number of processes), each process's own DeepSpeed shard
    under DeepSpeed's other optimizers (its bf16 one: as many processes), else whole."""
    if deepspeed_plugin(accelerator) is None:
        return False
    return BY_PARAMETER if by_parameter(optimizer) else True


def optimizer_state(accelerator, optimizer, parameters: dict[str, nn.Parameter]) -> dict:
    """What the checkpoint keeps of the optimizer (every process calls it): by parameter under ZeRO-1, 2 and 3."""
    if partitioned_optimizer(accelerator, optimizer) == BY_PARAMETER:
        return state_by_parameter(optimizer, parameters)
    return optimizer.state_dict()


def check_resumable(accelerator, state: dict, path) -> None:
    """Before any model loads: refuse the engine changes a checkpoint's optimizer state cannot cross (its
    state.json's `state`). State saved by parameter (ZeRO-1, 2 or 3) resumes under any of them with any number of
    processes; the whole state of a run without DeepSpeed only without it, and DeepSpeed's own shards only as
    written (checkpoint.read_state checks their process count)."""
    saved, plugin = state.get("partitioned_optimizer"), deepspeed_plugin(accelerator)
    zero = plugin is not None and plugin.zero_stage in (1, 2, 3)
    if saved == BY_PARAMETER and not zero:
        raise ValueError(f"cannot resume from {path}: its optimizer state was saved under DeepSpeed ZeRO (by "
                         "parameter); resume it under DeepSpeed ZeRO-1, 2 or 3, with any number of processes")
    if not saved and plugin is not None:
        raise ValueError(f"cannot resume from {path}: it was saved without DeepSpeed (the optimizer state whole), "
                         "and DeepSpeed cannot read that; resume it without DeepSpeed (one process or torchrun)")
