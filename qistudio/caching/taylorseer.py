"""TaylorSeer, as diffusers 0.42.1 defines it in its lite mode (hooks/taylorseer_cache.py, use_lite_mode=True):
the DiT's output is extrapolated on the steps that do not run it.

Per branch, calls are counted from 0. Call k runs the DiT when k < warmup_steps, or (k - warmup_steps - 1) %
cache_interval == 0, or k >= full_compute_from_step (diffusers' disable_cache_before_step / cache_interval /
disable_cache_after_step, the same rule, its "- 1" included: with the defaults, calls 0, 1, 2, 4, 9, 14, ...).
A computed output y updates the Taylor factors: F0 = y, F(j+1) = (Fj - Fj_prev) / (k - k_prev) for j < order
where the previous factor exists, stored in factors_dtype. Elsewhere the output is sum_j Fj (k - k_prev)^j / j!.

diffusers' default (not lite) mode extrapolates each block's attention output and still runs the rest of every
block; that form is not offered here (it would need the block's attention as a hook point).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import TaylorSeer
from .state import StepCache


class TaylorBranch:
    def __init__(self, setting: TaylorSeer):
        self.setting = setting
        self.dtype = getattr(torch, setting.factors_dtype)
        self.calls = -1
        self.last_update: int | None = None
        self.factors: list[torch.Tensor] = []
        self.output_dtype: torch.dtype | None = None

    def begin(self) -> bool:
        """Count a call; whether it runs the DiT."""
        self.calls += 1
        s, k = self.setting, self.calls
        return (k < s.warmup_steps or (k - s.warmup_steps - 1) % s.cache_interval == 0
                or (s.full_compute_from_step is not None and k >= s.full_compute_from_step))

    def update(self, output: torch.Tensor) -> None:
        self.output_dtype = output.dtype
        factors = [output]
        if self.last_update is not None:
            delta = self.calls - self.last_update
            for j in range(min(self.setting.order, len(self.factors))):
                factors.append((factors[j] - self.factors[j].to(output.dtype)) / delta)
        self.factors = [f.to(self.dtype) for f in factors]
        self.last_update = self.calls

    def predict(self) -> torch.Tensor:
        offset = self.calls - self.last_update
        output = torch.zeros_like(self.factors[0], dtype=self.output_dtype)
        for order, factor in enumerate(self.factors):
            output = output + factor.to(self.output_dtype) * (offset**order / math.factorial(order))
        return output


class TaylorSeerStepCache(StepCache):
    def __init__(self, setting: TaylorSeer):
        super().__init__(setting)
        self.branches: dict[str, TaylorBranch] = {}

    def forward(self, step: int, branches: tuple[str, ...], call: Callable) -> torch.Tensor:
        states = [self.branches.setdefault(name, TaylorBranch(self.setting)) for name in branches]
        compute = [state.begin() for state in states]
        for name, runs in zip(branches, compute):
            self.log.record(name).add(step, runs)
        if not any(compute):
            return torch.cat([state.predict() for state in states]) if len(states) > 1 else states[0].predict()
        output = call(None)
        size = output.shape[0] // len(states)
        parts = []
        for k, (state, runs) in enumerate(zip(states, compute)):
            rows = output[k * size : (k + 1) * size]
            if runs:
                state.update(rows)
            parts.append(rows if runs else state.predict())  # a batch whose branches disagree
        return output if all(compute) else torch.cat(parts)

