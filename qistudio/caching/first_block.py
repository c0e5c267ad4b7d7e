"""First-Block Cache, as diffusers 0.42.1 defines it (hooks/first_block_cache.py, after ParaAttention).

Block 0 always runs. Its image residual r (output - input) is compared with r_prev, block 0's residual on the
last step that ran every block: when mean |r - r_prev| / mean |r_prev| > threshold the remaining blocks run and
their residual (last block's output - block 0's output, image and text streams) is kept; otherwise that kept
residual is added to block 0's output instead. The first step always computes (no r_prev yet); r_prev is not
updated on skipped steps.
"""

from __future__ import annotations

import torch

from .config import FirstBlockCache
from .state import Change, MiddleBranch, MiddleCache


class FirstBlockBranch(MiddleBranch):
    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold
        self.head_residual: torch.Tensor | None = None
        self.tail_residuals: tuple[torch.Tensor, torch.Tensor] | None = None

    def measure(self, step, front_residual):
        if self.head_residual is None:
            return True
        return Change(front_residual, self.head_residual)

    def decide(self, change: float) -> bool:
        return change > self.threshold  # diffusers: compute when the change exceeds the threshold

    def computed(self, step, front_residual):
        self.head_residual = front_residual

    def store(self, img_residual, txt_residual):
        self.tail_residuals = (img_residual, txt_residual)

    def recall(self):
        return self.tail_residuals


class FirstBlockStepCache(MiddleCache):
    def __init__(self, setting: FirstBlockCache, num_layers: int):
        super().__init__(setting, num_layers, front=1, back=0, needs_front_residual=True)

    def new_branch(self) -> FirstBlockBranch:
        return FirstBlockBranch(self.setting.threshold)
