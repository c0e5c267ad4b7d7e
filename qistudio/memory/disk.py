"""Blocks whose weights stay in their safetensors files and are read for each use (offload_device="disk").

When host memory cannot hold a model, its streamable blocks are loaded as empty placeholders and read from the
memory-mapped checkpoint every time they run: into a pinned staging buffer on a worker thread, one block ahead,
then copied to the device slot on the side stream. The operating system's page cache keeps what fits in RAM, so a
machine with enough memory streams at host speed after the first step and one without still runs. The layout of
a block's bytes is the same as FlatWeights', so the streamer treats both alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..weights.build import read_weight
from ..weights.safetensors_io import TensorSource

_ALIGN = 64


@dataclass
class DiskSource:
    """The open checkpoint of one model and, per deferred parameter name, its key and shape."""

    source: TensorSource
    deferred: dict[str, tuple[str, torch.Size]]
    dtype: torch.dtype

    def covers(self, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in self.deferred)


@dataclass(frozen=True)
class _Entry:
    owner: nn.Module
    key: str  # parameter name inside owner
    checkpoint_key: str
    offset: int
    shape: torch.Size


class DiskBlockWeights:
    """One block's deferred parameters: filled from disk into a byte buffer, then pointed at like FlatWeights."""

    host = None  # no resident host copy: that is the point

    def __init__(self, block: nn.Module, prefix: str, disk: DiskSource):
        self.disk = disk
        self.entries: list[_Entry] = []
        self.element_size = torch.empty((), dtype=disk.dtype).element_size()
        offset = 0
        for name, param in block.named_parameters():
            full = prefix + name
            if full not in disk.deferred:
                raise ValueError(f"{full} was loaded into memory; a block streams from disk only as a whole")
            key, shape = disk.deferred[full]
            owner = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            self.entries.append(_Entry(owner, name.rpartition(".")[2], key, offset, shape))
            offset += -(-shape.numel() * self.element_size // _ALIGN) * _ALIGN
        self.nbytes = offset

    def _view(self, buffer: torch.Tensor, entry: _Entry) -> torch.Tensor:
        count = entry.shape.numel() * self.element_size
        return buffer[entry.offset : entry.offset + count].view(self.disk.dtype).view(entry.shape)

    def fill(self, buffer: torch.Tensor) -> None:
        """Read the block's tensors from the checkpoint into `buffer` (host memory)."""
        for entry in self.entries:
            self._view(buffer, entry).copy_(read_weight(self.disk.source, entry.checkpoint_key, self.disk.dtype))

    def point_to(self, buffer: torch.Tensor | None) -> None:
        """Views into `buffer`, or (None) back to empty placeholders."""
        for entry in self.entries:
            param = entry.owner._parameters[entry.key]
            param.data = torch.empty(0, dtype=self.disk.dtype) if buffer is None else self._view(buffer, entry)
