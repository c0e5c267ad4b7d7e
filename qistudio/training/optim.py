"""Optimizer and learning-rate schedule, each by name.

Optimizers (`optimizer`), with what each keeps per trained parameter besides the weight and its gradient:
  adamw       torch's AdamW: two moments in the parameter's dtype (2 x 2 bytes for the bf16 DiT, 2 x 4 for float32)
  adamw_bf16  AdamW with both moments in bfloat16 whatever the parameter's dtype (lean_optim.BF16AdamW): 4 bytes
  adamw_8bit  bitsandbytes' block-wise 8-bit AdamW: about 2 bytes (one process or DDP; not on FSDP's DTensors)
  adafactor   torch's Adafactor: factored second moment (a row and a column per matrix), no first moment; its
              learning rate is relative to each weight's RMS, as Adafactor defines it
`fused_optimizer_step` steps each parameter inside the backward as soon as its gradient is complete and frees the
gradient (lean_optim.StepInBackward): no whole-model gradient is held.

  reference  torch's ConstantLR with its defaults (a third of the rate for the first 5 steps), as the reference's
             runner builds it
  constant   the rate throughout, after an optional linear warm-up of `lr_warmup_steps`
  cosine     warm-up, then a half cosine from the rate down to 0 at the last step
The schedule steps once per optimizer step (never per micro-batch or per process).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import TrainConfig
from .lean_optim import BF16AdamW, StepInBackward


def make_optimizer(parameters, config: TrainConfig) -> torch.optim.Optimizer:
    make = optimizer_factory(config)
    parameters = list(parameters)
    return StepInBackward(parameters, make) if config.fused_optimizer_step else make(parameters)


def optimizer_factory(config: TrainConfig) -> Callable[[list], torch.optim.Optimizer]:
    """parameters -> the optimizer `config.optimizer` names, at the run's learning rate and weight decay."""
    settings = dict(lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "adamw_bf16":
        return lambda parameters: BF16AdamW(parameters, **settings)
    if config.optimizer == "adamw_8bit":
        try:
            from bitsandbytes.optim import AdamW8bit
        except ImportError as e:
            raise ImportError(f"optimizer adamw_8bit needs bitsandbytes: pip install 'qistudio[lowmem]' ({e})") from None
        return lambda parameters: AdamW8bit(parameters, **settings)
    if config.optimizer == "adafactor":
        return lambda parameters: torch.optim.Adafactor(parameters, **settings)
    return lambda parameters: torch.optim.AdamW(parameters, **settings)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    if config.lr_scheduler == "reference":
        return torch.optim.lr_scheduler.ConstantLR(optimizer)
    warmup = config.lr_warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
