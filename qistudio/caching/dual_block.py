"""DBCache (Dual Block Cache) and its fixed-schedule form, as cache-dit 1.5.3 defines them
(caching/cache_blocks/pattern_base.py, cache_contexts/cache_context.py and cache_manager.py).

Per step and branch: the first `front_blocks` (Fn) run; their image residual (output - input) is compared with
the one kept from the last computed step. The step is cached, i.e. the middle blocks are replaced by the middle
residual kept from the last computed step (image and text streams; extrapolated by the TaylorSeer calibrator when
taylorseer_order > 0), when none of these forbids it, checked in cache-dit's order:
  the step is a warm-up step (0, warmup_interval, ... below warmup_steps); max_cached_steps (>= 0) steps of this
  branch are already cached; max_continuous_cached_steps (>= 0) steps in a row are; the threshold is <= 0; no
  residual is kept yet;
and the change mean |r - r_prev| / mean |r_prev| is below the threshold (a threshold >= 1 caches without
measuring). The last `back_blocks` (Bn) always run. r_prev is updated on computed steps only.

The fixed schedule is cache-dit's `steps_computation_mask` with the "static" policy: computed steps are those
marked 1 (here every `every`-th step), the rest cached with no measure.
"""

from __future__ import annotations

import math

import torch

from .config import DBCache, FixedSchedule
from .state import Change, MiddleBranch, MiddleCache


class TaylorCalibrator:
    """cache-dit's TaylorSeer calibrator for one stream (calibrators/taylorseer.py, TaylorSeerState): a ladder of
    divided differences of the residuals of computed steps, evaluated ahead on cached ones. Made on its first
    update, as there, so its step counter runs one behind the branch's; derivatives start at its step 2."""

    def __init__(self, order: int):
        self.order = order
        self.step: int | None = None
        self.last_update = -1
        self.ladder: list[torch.Tensor | None] = [None] * (order + 1)

    def begin_step(self) -> None:
        if self.step is not None:
            self.step += 1

    def update(self, value: torch.Tensor) -> None:
        if self.step is None:
            self.step = -1
        previous, ladder = self.ladder, [value] + [None] * self.order
        window = self.step - self.last_update
        for i in range(self.order):
            if previous[i] is None or self.step <= 1:
                break
            ladder[i + 1] = (ladder[i] - previous[i]) / window
        self.ladder, self.last_update = ladder, self.step

    def approximate(self) -> torch.Tensor:
        elapsed = self.step - self.last_update
        output = 0
        for i, derivative in enumerate(self.ladder):
            if derivative is None:
                break
            output += (1 / math.factorial(i)) * derivative * (elapsed**i)  # cache-dit's expression, its rounding
        return output


class DBCacheBranch(MiddleBranch):
    def __init__(self, setting: DBCache):
        super().__init__()
        self.setting = setting
        self.warmup = range(0, setting.warmup_steps, setting.warmup_interval)
        self.cached_steps: list[int] = []
        self.continuous = 0
        self.front_residual: torch.Tensor | None = None
        self.residuals: tuple[torch.Tensor, torch.Tensor] | None = None
        order = setting.taylorseer_order
        self.calibrators = (TaylorCalibrator(order), TaylorCalibrator(order)) if order else None

    def measure(self, step, front_residual):
        if not self.cached_steps or self.cached_steps[-1] != step - 1:
            self.continuous = 0  # a computed step ends the run of cached ones
        for calibrator in self.calibrators or ():
            calibrator.begin_step()
        s = self.setting
        threshold = s.residual_diff_threshold
        if (step in self.warmup
                or 0 <= s.max_cached_steps <= len(self.cached_steps)
                or 0 <= s.max_continuous_cached_steps <= self.continuous
                or threshold <= 0 or self.front_residual is None):
            return True
        if threshold >= 1:
            return False
        return Change(front_residual, self.front_residual)

    def decide(self, change: float) -> bool:
        return not change < self.setting.residual_diff_threshold  # cache-dit: cache when below the threshold

    def computed(self, step, front_residual):
        self.front_residual = front_residual

    def skipped(self, step):
        self.cached_steps.append(step)
        self.continuous += 1

    def store(self, img_residual, txt_residual):
        if self.calibrators is None:
            self.residuals = (img_residual, txt_residual)
        else:
            self.calibrators[0].update(img_residual)
            self.calibrators[1].update(txt_residual)

    def recall(self):
        if self.calibrators is None:
            return self.residuals
        return self.calibrators[0].approximate(), self.calibrators[1].approximate()


class DBStepCache(MiddleCache):
    def __init__(self, setting: DBCache, num_layers: int):
        super().__init__(setting, num_layers, setting.front_blocks, setting.back_blocks, needs_front_residual=True)

    def new_branch(self) -> DBCacheBranch:
        return DBCacheBranch(self.setting)


class FixedBranch(MiddleBranch):
    def __init__(self, every: int):
        super().__init__()
        self.every = every
        self.residuals = None

    def measure(self, step, front_residual):
        return step % self.every == 0

    def store(self, img_residual, txt_residual):
        self.residuals = (img_residual, txt_residual)

    def recall(self):
        return self.residuals


class FixedStepCache(MiddleCache):
    def __init__(self, setting: FixedSchedule, num_layers: int):
        super().__init__(setting, num_layers, setting.front_blocks, setting.back_blocks, needs_front_residual=False)

    def new_branch(self) -> FixedBranch:
        return FixedBranch(self.setting.every)
