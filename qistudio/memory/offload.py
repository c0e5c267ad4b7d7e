"""Weights that rest in host memory and visit the GPU: whole models per phase, or DiT blocks one at a time.

Design note. Everything here moves bytes, never modules: a group of parameters (one block, or one whole model)
is laid out once as a flat byte buffer in pinned host memory, and its parameters are re-pointed (`param.data =`)
at views of either that host buffer or a device buffer of the same layout. Parameter objects, names and hooks
(LoRA) stay put, so nothing else in the library knows a model is offloaded.

Streaming a ModuleList (the DiT's 60 blocks): a few device "slots" of one block's size are reused by every
streamed block. A forward pre-hook on block i makes the compute stream wait until block i's copy has landed,
points the block at its slot, and launches the copy of the next streamed block (in execution order, wrapping
around to the next forward) on a side stream into the other slot; the side stream first waits until that slot's
previous occupant has finished computing. So with two slots a copy overlaps at least one block of compute;
resident blocks are spread evenly between streamed ones so each copy overlaps several. The DiT forward is a plain
loop, so the order is known without tracing. On a device without streams (CPU tests) the same code copies
synchronously.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn as nn

_ALIGN = 64  # bytes; keeps every view aligned for vectorised kernels


@dataclass(frozen=True)
class _Slot:
    name: str
    owner: nn.Module
    attr: str  # "_parameters" or "_buffers"
    offset: int
    dtype: torch.dtype
    shape: torch.Size


class FlatWeights:
    """The parameters and buffers of one module laid out in a flat byte buffer; re-pointable between copies."""

    def __init__(self, module: nn.Module, pin: bool, exclude: tuple[nn.Module, ...] = ()):
        self._lay_out(module, exclude)
        self.host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
        for entry in self.entries:
            self._view(self.host, entry).copy_(getattr(entry.owner, entry.attr)[entry.name.rpartition(".")[2]])
        self.point_to(self.host)

    def _lay_out(self, module: nn.Module, exclude: tuple[nn.Module, ...]) -> None:
        """`entries` and `nbytes`: where each parameter and buffer of `module` (less `exclude`) sits in the layout."""
        self.entries: list[_Slot] = []
        offset = 0
        skipped = {id(m) for ex in exclude for m in ex.modules()}
        for owner_name, owner in module.named_modules():
            if id(owner) in skipped:
                continue
            for attr in ("_parameters", "_buffers"):
                for name, tensor in getattr(owner, attr).items():
                    if tensor is None:
                        continue
                    self.entries.append(_Slot(f"{owner_name}.{name}", owner, attr, offset, tensor.dtype, tensor.shape))
                    offset += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
        self.nbytes = offset

    @property
    def signature(self) -> tuple:
        """Equal for modules of identical structure (the DiT's blocks), so they can share device slots."""
        return tuple((e.offset, e.dtype, tuple(e.shape)) for e in self.entries)

    @staticmethod
    def _view(buffer: torch.Tensor, entry: _Slot) -> torch.Tensor:
        count = entry.shape.numel() * torch.empty((), dtype=entry.dtype).element_size()
        return buffer[entry.offset : entry.offset + count].view(entry.dtype).view(entry.shape)

    def point_to(self, buffer: torch.Tensor) -> None:
        """Make every parameter/buffer a view into `buffer` (the host copy or a device copy of the same layout)."""
        for entry in self.entries:
            tensors = getattr(entry.owner, entry.attr)
            key = entry.name.rpartition(".")[2]
            view = self._view(buffer, entry)
            if entry.attr == "_parameters":
                tensors[key].data = view
            else:
                tensors[key] = view

    def copy_to(self, buffer: torch.Tensor, non_blocking: bool = True) -> None:
        buffer.copy_(self.host, non_blocking=non_blocking)


def _device_buffer(nbytes: int, device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


class ModelOffload:
    """A model (less any `exclude`d submodules) resting in pinned host memory, copied to the device for its phase
    (`weights`: another host side of the same layout, memory/mapped.py's)."""

    def __init__(self, model: nn.Module, device, exclude: tuple[nn.Module, ...] = (), weights=None):
        self.device = torch.device(device)
        self.weights = weights if weights is not None else FlatWeights(model, pin=self.device.type == "cuda",
                                                                       exclude=exclude)
        self.device_buffer: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes

    def onload(self) -> None:
        if self.device_buffer is None:
            self.device_buffer = _device_buffer(self.weights.nbytes, self.device)
            self.weights.copy_to(self.device_buffer)
            self.weights.point_to(self.device_buffer)

    def offload(self) -> None:
        if self.device_buffer is not None:
            self.weights.point_to(self.weights.host)
            self.device_buffer = None  # freed once the last kernel reading it has run (stream-ordered)


def spread(num_blocks: int, num_streamed: int) -> list[int]:
    """Which blocks to stream: `num_streamed` indices spread evenly, so resident blocks sit between them."""
    if num_streamed <= 0:
        return []
    if num_streamed >= num_blocks:
        return list(range(num_blocks))
    return sorted({round(i * num_blocks / num_streamed) for i in range(num_streamed)})


class _StreamedBlocks:
    """What the inference and training streamers share: hooks around each streamed block (`self.streamed` indexes
    `self.blocks`; `self.weights` holds each one's FlatWeights)."""

    @property
    def streamed_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())

    def attach(self):
        for index in self.streamed:
            self.handles.append(self.blocks[index].register_forward_pre_hook(self._make_pre_hook(index)))
            self.handles.append(self.blocks[index].register_forward_hook(self._make_post_hook(index)))
        return self


class BlockStreamer(_StreamedBlocks):
    """Stream the weights of some blocks of a ModuleList through `num_slots` device buffers.

    The other blocks are left alone (a ModelOffload that excludes the streamed ones moves them). `attach()` adds
    the hooks; `detach()` removes them and leaves the streamed blocks in host memory.
    """

    def __init__(self, blocks: nn.ModuleList, device, streamed: list[int], num_slots: int = 2, weights=None):
        self.device = torch.device(device)
        self.blocks = blocks
        self.streamed = list(streamed)
        self.num_slots = max(1, min(num_slots, len(self.streamed)))
        use_streams = self.device.type == "cuda"
        # Per streamed block: its pinned host copy (FlatWeights), or a reader of its checkpoint (disk.py).
        self.weights = weights if weights is not None else {i: FlatWeights(blocks[i], pin=use_streams)
                                                            for i in self.streamed}
        # Blocks of different layouts still share slots: each uses the front of one.
        self.slot_bytes = max((w.nbytes for w in self.weights.values()), default=0)
        self.slots = [_device_buffer(self.slot_bytes, self.device) for _ in range(self.num_slots)]
        self.rank = {block: r for r, block in enumerate(self.streamed)}
        self.copy_stream = torch.cuda.Stream(self.device) if use_streams else None
        self.copied = [None] * len(self.streamed)  # per rank: event when its copy landed
        self.slot_free = [None] * self.num_slots  # per slot: event when its last occupant finished computing
        self.pending: set[int] = set()  # ranks whose copy was launched and not yet consumed
        self.handles = []
        self.from_disk = any(w.host is None for w in self.weights.values())
        if self.from_disk and use_streams:
            # Disk reads land in pinned staging buffers on a worker thread, one block ahead of the compute.
            self.staging = [torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True)
                            for _ in range(self.num_slots)]
            self.staging_done = [None] * self.num_slots
            self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qistudio-disk")
            self.reads: dict[int, Future] = {}


    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for weights in self.weights.values():
            weights.point_to(weights.host)

    def forget_prefetch(self) -> None:
        """Drop copies made ahead (the end of a call): the weights may change before the next one (a fused LoRA)."""
        for read in getattr(self, "reads", {}).values():
            read.result()
        if self.from_disk and self.copy_stream is not None:
            self.reads.clear()
        self.pending.clear()

    def _launch(self, rank: int) -> None:
        """Copy streamed block `rank` into its slot, after the slot's previous occupant is done."""
        if rank in self.pending:
            return
        slot = rank % self.num_slots
        # This copy replaces what was prefetched into the slot: blocks run out of order when a step cache skips some.
        self.pending -= {r for r in self.pending if r % self.num_slots == slot}
        weights = self.weights[self.streamed[rank]]
        target = self.slots[slot][: weights.nbytes]
        if self.copy_stream is None:
            weights.fill(target) if weights.host is None else weights.copy_to(target, non_blocking=False)
        elif weights.host is None:
            self.reads[rank] = self.reader.submit(self._read_and_copy, rank, slot, weights, target)
        else:
            with torch.cuda.stream(self.copy_stream):
                if self.slot_free[slot] is not None:
                    self.copy_stream.wait_event(self.slot_free[slot])
                weights.copy_to(target)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
                self.copied[rank] = event
        self.pending.add(rank)

    def _read_and_copy(self, rank: int, slot: int, weights, target: torch.Tensor) -> None:
        """Worker thread: read a block from disk into staging, then queue its copy to the device slot."""
        staging = self.staging[slot][: weights.nbytes]
        if self.staging_done[slot] is not None:
            self.staging_done[slot].synchronize()  # the previous copy out of this staging buffer has finished
        weights.fill(staging)
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            if self.slot_free[slot] is not None:
                self.copy_stream.wait_event(self.slot_free[slot])
            target.copy_(staging, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.copied[rank] = event
        self.staging_done[slot] = event

    def _make_pre_hook(self, index: int):
        def pre_hook(module, args):
            rank = self.rank[index]
            self._launch(rank)  # no-op when prefetched
            if self.from_disk and self.copy_stream is not None:
                self.reads.pop(rank).result()
            if self.copy_stream is not None:
                torch.cuda.current_stream(self.device).wait_event(self.copied[rank])
            self.pending.discard(rank)
            weights = self.weights[index]
            weights.point_to(self.slots[rank % self.num_slots][: weights.nbytes])
            following = (rank + 1) % len(self.streamed)  # the next streamed block, wrapping to the next call
            if following % self.num_slots != rank % self.num_slots:
                self._launch(following)  # into the other slot, while this block computes

        return pre_hook

    def _make_post_hook(self, index: int):
        def post_hook(module, args, output):
            rank = self.rank[index]
            # Between uses a block's parameters are its host copy again (kernels already queued keep their
            # pointers), so code outside a forward (fusing a LoRA, reading weights) sees the weights that stream.
            self.weights[index].point_to(self.weights[index].host)
            if self.copy_stream is not None:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
                self.slot_free[rank % self.num_slots] = event
            self._launch((rank + 1) % len(self.streamed))  # no-op unless it shares this block's slot
            return output

        return post_hook
