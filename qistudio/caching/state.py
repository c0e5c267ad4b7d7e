"""What every step cache shares: one call's state per guidance branch, the record of computed steps, the
residual-change measure, and the gate that skips the DiT's middle blocks.

Design note. A cache lives for one pipeline call and keeps its state per guidance branch ("cond", "uncond"), as
both references do: diffusers runs the branches as separate transformer calls, each in its own cache context, and
cache-dit keeps separate buffers and counters for the CFG call. So each branch decides on its own, whether the
branches run as separate DiT calls (cfg_batch=False) or as the two halves of one batch (cfg_batch=True). In a
batch where they disagree, the middle blocks run for the whole batch and the skipping branch's rows take their
cached value instead: the same result as two calls, at the cost of that step's saving. Branches agree on almost
every step (their residuals move alike; fixed schedules agree always).

Three methods (First-Block Cache, DBCache, the fixed schedule) skip the same thing: the blocks between the first
`front` and the last `back`. `MiddleGate` is that shape, handed to the DiT as its block gate: at boundary `front`
it asks each branch whether to skip (one host sync for all branches), at boundary N - back it stores the middle's
residual (output - input, image and text streams) or puts the cached one in. Branch states say what to decide and
what to keep (`MiddleBranch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import StepCacheSetting, setting_text


def relative_change(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """mean |current - previous| / mean |previous| (a 0-d tensor): the residual change both references measure."""
    return (current - previous).abs().mean() / previous.abs().mean()


@dataclass
class Record:
    """Which steps of one branch ran the DiT in full, and which were cached."""

    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    def add(self, step: int, computed: bool) -> None:
        (self.computed if computed else self.skipped).append(step)


@dataclass
class CacheLog:
    """What a step cache did in one call: its setting and each branch's record. It outlives the call (the pipeline
    keeps it for `last_cache_report`); the cache's tensors do not."""

    setting: StepCacheSetting
    records: dict[str, Record] = field(default_factory=dict)

    def record(self, branch: str) -> Record:
        return self.records.setdefault(branch, Record())

    def report(self) -> dict:
        """The setting (full text form) and, per branch, the steps computed: for PNG metadata and benchmarks."""
        return {"cache": setting_text(self.setting),
                "computed_steps": {name: list(r.computed) for name, r in self.records.items()}}


class StepCache:
    """One call's step cache: `forward(step, branches, call)` runs one DiT call (the rows of `branches`, equal
    parts of the batch in that order) through `call(block_gate)` or serves it from the cache."""

    def __init__(self, setting: StepCacheSetting):
        self.setting = setting
        self.log = CacheLog(setting)

    def forward(self, step: int, branches: tuple[str, ...], call: Callable) -> torch.Tensor:
        raise NotImplementedError

    def report(self) -> dict:
        return self.log.report()


def _rows(tensor: torch.Tensor, part: int, parts: int) -> torch.Tensor:
    if parts == 1:
        return tensor
    size = tensor.shape[0] // parts
    return tensor[part * size : (part + 1) * size]


@dataclass(frozen=True)
class Change:
    """A branch's residual change, still to measure: mean |current - previous| / mean |previous|."""

    current: torch.Tensor
    previous: torch.Tensor


class BranchRows:
    """Which rows of a gated DiT call are each branch's (equal parts of the batch, in branch order) and how the
    branches' changes are measured (over those rows). A caller that splits the call across processes gives the
    gate its own (parallel/cache.py: this process's rows, changes measured over every process's)."""

    def __init__(self, parts: int):
        self.parts = parts

    def take(self, tensor: torch.Tensor, branch: int) -> torch.Tensor:
        return _rows(tensor, branch, self.parts)

    def changes(self, pending: list[tuple[int, Change]]) -> list[float]:
        """The measured change of each (branch, Change): the step's one host sync."""
        return torch.stack([relative_change(c.current, c.previous) for _, c in pending]).tolist()


class MiddleBranch:
    """One branch's state for the methods that skip the middle blocks."""

    def __init__(self):
        self.record = Record()

    def measure(self, step: int, front_residual: torch.Tensor | None) -> bool | Change:
        """Start `step`: True/False when the rule decides alone (compute / skip), else the residual Change that
        `decide` compares once measured, so all branches share one host sync."""
        raise NotImplementedError

    def decide(self, change: float) -> bool:
        """Whether to compute, given the measured change."""
        raise NotImplementedError

    def computed(self, step: int, front_residual: torch.Tensor | None) -> None:
        """The step computes: keep what the next decisions compare against."""

    def skipped(self, step: int) -> None:
        """The step is skipped."""

    def store(self, img_residual: torch.Tensor, txt_residual: torch.Tensor) -> None:
        raise NotImplementedError

    def recall(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MiddleGate:
    """The DiT's block gate for one call of the DiT (models/dit.py: BlockGate): blocks [start, end) run only when
    a branch needs them. `needs_front_residual`: whether the decision reads the front blocks' residual."""

    def __init__(self, step: int, branches: list[MiddleBranch], start: int, end: int, needs_front_residual: bool):
        self.step, self.branches, self.start, self.end = step, branches, start, end
        self.needs_front_residual = needs_front_residual  # then start >= 1 (the settings' rule)
        self.rows = BranchRows(len(branches))
        self.run_middle = True
        self.compute: list[bool] = []
        self.input = self.front = None

    def watches(self, boundary: int) -> bool:
        return boundary == self.start or boundary == self.end or (self.needs_front_residual and boundary == 0)

    def runs(self, index: int) -> bool:
        return self.run_middle or not self.start <= index < self.end

    def __call__(self, boundary: int, img: torch.Tensor, txt: torch.Tensor):
        if boundary == 0 and self.needs_front_residual:
            self.input = img
        if boundary == self.start:
            img, txt = self._decide(img, txt)
        if boundary == self.end and self.run_middle:
            img, txt = self._finish(img, txt)
        return img, txt

    def _decide(self, img, txt):
        residual = img - self.input if self.needs_front_residual else None
        fronts = [None if residual is None else self.rows.take(residual, k) for k in range(len(self.branches))]
        measured = [b.measure(self.step, f) for b, f in zip(self.branches, fronts)]
        pending = [(k, m) for k, m in enumerate(measured) if isinstance(m, Change)]
        changes = iter(self.rows.changes(pending) if pending else [])  # the one host sync of the step
        self.compute = [b.decide(next(changes)) if isinstance(m, Change) else m
                        for b, m in zip(self.branches, measured)]
        for branch, front, compute in zip(self.branches, fronts, self.compute):
            branch.record.add(self.step, compute)
            if compute:
                branch.computed(self.step, front)
            else:
                branch.skipped(self.step)
        self.run_middle = any(self.compute)
        if not self.run_middle:
            cached = [b.recall() for b in self.branches]
            return self._plus_cached(img, [c[0] for c in cached]), self._plus_cached(txt, [c[1] for c in cached])
        self.front = (img, txt)
        return img, txt

    def _finish(self, img, txt):
        take = self.rows.take
        front_img, front_txt = self.front
        img_residual, txt_residual = img - front_img, txt - front_txt
        out_img, out_txt = [], []
        for k, (branch, compute) in enumerate(zip(self.branches, self.compute)):
            if compute:
                branch.store(take(img_residual, k), take(txt_residual, k))
                out_img.append(take(img, k))
                out_txt.append(take(txt, k))
            else:  # this branch skips while the other computes (one batch): its rows from the cache
                cached_img, cached_txt = branch.recall()
                out_img.append(cached_img + take(front_img, k))
                out_txt.append(cached_txt + take(front_txt, k))
        if all(self.compute):
            return img, txt
        return torch.cat(out_img), torch.cat(out_txt)

    def _plus_cached(self, tensor: torch.Tensor, cached: list[torch.Tensor]) -> torch.Tensor:
        """Each branch's rows plus its cached residual (residual + rows: the references' order of the sum)."""
        if len(cached) == 1:
            return cached[0] + self.rows.take(tensor, 0)
        return torch.cat([c + self.rows.take(tensor, k) for k, c in enumerate(cached)])


class MiddleCache(StepCache):
    """A step cache that skips the middle blocks; `new_branch()` makes each branch's state."""

    def __init__(self, setting: StepCacheSetting, num_layers: int, front: int, back: int,
                 needs_front_residual: bool):
        super().__init__(setting)
        self.start, self.end, self.needs_front_residual = front, num_layers - back, needs_front_residual
        self.branches: dict[str, MiddleBranch] = {}

    def new_branch(self) -> MiddleBranch:
        raise NotImplementedError

    def forward(self, step: int, branches: tuple[str, ...], call: Callable) -> torch.Tensor:
        states = []
        for name in branches:
            if name not in self.branches:
                self.branches[name] = self.new_branch()
                self.log.records[name] = self.branches[name].record
            states.append(self.branches[name])
        return call(MiddleGate(step, states, self.start, self.end, self.needs_front_residual))
