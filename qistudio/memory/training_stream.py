"""Frozen blocks streamed through the device for a training step: the forward, then the backward in reverse.

Design note. Training differs from inference (offload.BlockStreamer) in one way that decides everything: the
backward reads a block's weights again, after the forward has moved on. With gradient checkpointing each block's
forward is re-run during the backward (block 59 first, down to 0), and its backward follows at once, reading what
that recompute saved: linear weights (`weight.t()` views, or FP8Linear's float8 aliases) and norm scales, all
pointing at the block's device slot. So a slot may be refilled only once its block's backward is over, and the
hooks must know which way the step is going.

- Forward (outside the autograd engine): as in inference. Block i's pre-hook points it at its slot (waiting for
  its copy) and launches the copy of the next streamed block into the other slot; its post-hook points it back at
  the host copy and marks the slot free once the compute stream gets there. Under checkpointing nothing of the
  forward is kept, so the slot is indeed free.
- Backward (inside the engine, `torch._C._current_graph_task_id() != -1`): block i's pre-hook fires when its
  recompute starts. The block recomputed before it (the next streamed one up) is finished by then: every node of
  its backward that reads a weight lies on the path from its output to its inputs, and block i's backward needs the
  gradient of those inputs complete. So that block is released (host copy, slot free event) and the copy of the
  streamed block below i is launched into its slot. The recompute may stop early (checkpoint's early stop), so
  nothing is done in post-hooks during the backward.

Slots remember which block they hold: the forward's last two streamed blocks are the backward's first two, and the
backward's last two the next forward's first two, so those four copies per step are skipped. Without streams (the
CPU, in tests) the same code copies synchronously into separate slot buffers, so a slot refilled too early gives
wrong gradients there too.

Streamed blocks must run under gradient checkpointing whenever the graph is on (else the forward's saved tensors
would point into slots that later blocks overwrite): the pre-hook refuses otherwise.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .offload import FlatWeights, _device_buffer, _StreamedBlocks


def in_backward() -> bool:
    """True inside the autograd engine (a checkpointed block's recompute), False in a forward."""
    return torch._C._current_graph_task_id() != -1


class TrainingBlockStreamer(_StreamedBlocks):
    """Stream the frozen weights of `streamed` blocks of a ModuleList through `num_slots` device buffers.

    `weights[i]` is block i's FlatWeights (its frozen tensors only: trainable ones stay resident, outside it).
    `checkpointed()` says whether the blocks run under gradient checkpointing.
    """

    def __init__(self, blocks: nn.ModuleList, device, streamed: list[int], weights: dict[int, FlatWeights],
                 checkpointed: Callable[[], bool], num_slots: int = 2):
        self.device = torch.device(device)
        self.blocks = blocks
        self.streamed = list(streamed)
        self.weights = weights
        self.checkpointed = checkpointed
        self.num_slots = max(1, min(num_slots, len(self.streamed)))
        self.slot_bytes = max((w.nbytes for w in weights.values()), default=0)
        self.slots = [_device_buffer(self.slot_bytes, self.device) for _ in range(self.num_slots)]
        self.rank = {block: r for r, block in enumerate(self.streamed)}
        cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.occupant: list[int | None] = [None] * self.num_slots  # rank whose bytes a slot holds (or will)
        self.ready: list = [None] * self.num_slots  # per slot: event when its copy has landed
        self.free: list = [None] * self.num_slots  # per slot: event when its last reader has run
        self.in_use: set[int] = set()  # ranks whose parameters point at their slot
        self.copies = 0  # blocks copied so far (tests and benchmarks read it)
        self.handles = []

    def detach(self) -> None:
        """Remove the hooks; every streamed block's parameters point at its host copy."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for rank in list(self.in_use):
            self._release(rank)
        self.occupant = [None] * self.num_slots

    # -- slots --------------------------------------------------------------------------------------------------------
    def _slot_view(self, rank: int) -> torch.Tensor:
        return self.slots[rank % self.num_slots][: self.weights[self.streamed[rank]].nbytes]

    def _load(self, rank: int) -> None:
        """Start copying block `rank` into its slot, unless the slot holds it already."""
        slot = rank % self.num_slots
        if self.occupant[slot] == rank:
            return
        if self.occupant[slot] in self.in_use:
            raise RuntimeError(f"slot {slot} still serves streamed block rank {self.occupant[slot]}")
        weights, target = self.weights[self.streamed[rank]], self._slot_view(rank)
        if self.copy_stream is None:
            weights.copy_to(target, non_blocking=False)
        else:
            with torch.cuda.stream(self.copy_stream):
                if self.free[slot] is not None:
                    self.copy_stream.wait_event(self.free[slot])
                weights.copy_to(target)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
                self.ready[slot] = event
        self.occupant[slot] = rank
        self.copies += 1

    def _use(self, rank: int) -> None:
        self._load(rank)
        slot = rank % self.num_slots
        if self.copy_stream is not None and self.ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        self.weights[self.streamed[rank]].point_to(self._slot_view(rank))
        self.in_use.add(rank)

    def _release(self, rank: int) -> None:
        """Back to the host copy; the slot may be refilled once the kernels queued so far have run."""
        self.weights[self.streamed[rank]].point_to(self.weights[self.streamed[rank]].host)
        self.in_use.discard(rank)
        if self.copy_stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.free[rank % self.num_slots] = event

    # -- hooks (kept out of compiled regions: they move pointers and record events) -----------------------------------
    def _make_pre_hook(self, index: int):
        @torch.compiler.disable
        def pre_hook(module, args):
            rank = self.rank[index]
            backward = in_backward()
            if not backward and torch.is_grad_enabled() and not self.checkpointed():
                raise RuntimeError("streamed blocks need gradient checkpointing when gradients are on (the backward "
                                   "re-reads each block's weights); turn on use_gradient_checkpointing")
            for other in [r for r in self.in_use if r != rank]:
                self._release(other)  # backward: the block above has finished its backward
            self._use(rank)
            following = self._following(rank, backward)
            if following is not None and following % self.num_slots != rank % self.num_slots:
                self._load(following)  # into the other slot, while this block computes

        return pre_hook

    def _following(self, rank: int, backward: bool) -> int | None:
        """The streamed block needed next: downwards in the backward, upwards in the forward. After the last block of
        a forward with gradients on comes the backward, which starts with blocks still in their slots."""
        if backward:
            return rank - 1 if rank > 0 else None
        if rank + 1 < len(self.streamed):
            return rank + 1
        return None if torch.is_grad_enabled() else 0

    def _make_post_hook(self, index: int):
        @torch.compiler.disable
        def post_hook(module, args, output):
            if not in_backward():  # a recompute keeps its block until the next one starts
                self._release(self.rank[index])
            return output

        return post_hook
