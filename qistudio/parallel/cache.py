"""Step caching split across ranks: each rank gates its share of the DiT call, every rank makes the same decisions.

Design note. The step caches (qistudio/caching) decide per guidance branch from the change of the front blocks'
image residual, mean |r - r_prev| / mean |r_prev| over the branch's rows and image tokens. Under parallelism a rank
holds some rows (data x cfg shares; with cfg=2 one branch's rows) and one chunk of the image tokens (ring x
ulysses), padded. Measured on that alone, ranks would skip different steps and their collectives would no longer
meet. So every rank sums |r - r_prev|, |r_prev| and the element count over its own real rows (not the repeated
padding rows) and valid tokens (not the padding tokens), per branch, and one all-reduce over the world gives every
rank each branch's whole-batch change: the same numbers one process measures (summed in another order; the means
rounded to the residual's dtype as torch's mean rounds them), so the same steps skip, on every rank, per branch.
Every rank knows every branch's decision and runs the middle blocks when any branch computes, as one process does
for a batch whose branches disagree (its skipping rows take their cached value): the ranks' collectives stay in
step, and a cfg=2 group never waits on a gather the other skipped.

cache-dit's context parallelism averages mean |r - r_prev| and mean |r_prev| over the ranks (AVG all-reduces);
that equals the whole-batch measure only when every rank holds as many valid tokens, and over a world that splits
the guidance branches it would merge their decisions. Ours is the one-process measure for any split.

Cached residuals stay per rank (its rows, its tokens): no memory is spent on the other ranks' shares. TaylorSeer
needs nothing here: its decisions count steps, and it extrapolates the whole output every rank already has.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..caching.state import BranchRows, Change
from .collectives import all_reduce_sum
from .degrees import ParallelConfigError
from .layout import TokenLayout
from .rows import RowShare


class ShardedBranchRows(BranchRows):
    """The branches' rows in this rank's share of the call and their changes measured over the whole call."""

    def __init__(self, parts: int, rows: RowShare, layout: TokenLayout):
        super().__init__(parts)
        size = rows.total // parts  # rows per branch, branches in order (the batched call's layout)
        self.ranges = []
        for branch in range(parts):
            local = [i for i, row in enumerate(rows.indices) if branch * size <= row < (branch + 1) * size]
            self.ranges.append((local[0], local[-1] + 1) if local else (0, 0))
        self.real = torch.tensor(rows.real)
        self.tokens = layout.valid_local  # valid image tokens of this rank's chunk (a prefix)

    def take(self, tensor: torch.Tensor, branch: int) -> torch.Tensor:
        start, end = self.ranges[branch]
        return tensor[start:end]

    def changes(self, pending: list[tuple[int, Change]]) -> list[float]:
        sums, dtype = [], pending[0][1].current.dtype
        for branch, change in pending:
            start, end = self.ranges[branch]
            real = self.real[start:end].to(change.current.device)
            current, previous = (t[real, : self.tokens] for t in (change.current, change.previous))
            sums.append(torch.stack([(current - previous).abs().sum(dtype=torch.float64),
                                     previous.abs().sum(dtype=torch.float64),
                                     torch.tensor(float(previous.numel()), dtype=torch.float64,
                                                  device=previous.device)]))
        total = all_reduce_sum(torch.stack(sums), "step cache residual change")  # (branches, 3) over the world
        means = (total[:, :2] / total[:, 2:]).to(dtype)  # torch's mean rounds to the tensor's dtype
        return (means[:, 0] / means[:, 1]).tolist()


def shard_gate(gate, rows: RowShare, layout: TokenLayout):
    """`gate` (a step cache's block gate) deciding over the whole call while it sees this rank's share."""
    if gate is None or dist.get_world_size() == 1:
        return gate
    if not isinstance(getattr(gate, "rows", None), BranchRows):
        raise ParallelConfigError(f"the block gate {type(gate).__name__} cannot be split across ranks: it does not "
                                  "say which rows are whose")
    gate.rows = ShardedBranchRows(gate.rows.parts, rows, layout)
    return gate
