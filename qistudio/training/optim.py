"""Optimizer and learning-rate schedule: AdamW over the trainable parameters, and the schedule by name.

  reference  torch's ConstantLR with its defaults (a third of the rate for the first 5 steps), as the reference's
             runner builds it
  constant   the rate throughout, after an optional linear warm-up of `lr_warmup_steps`
  cosine     warm-up, then a half cosine from the rate down to 0 at the last step
The schedule steps once per optimizer step (never per micro-batch or per process).
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def make_optimizer(parameters, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(parameters), lr=config.learning_rate, weight_decay=config.weight_decay)


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
