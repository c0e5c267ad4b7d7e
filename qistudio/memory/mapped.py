"""Weights that rest where they were loaded, with no host copy: a quantised model's linears as views of its file.

Design note. Offloading normally copies a model's weights into one pinned host buffer (offload.FlatWeights): fast to
copy from, but a second copy in RAM. A quantised model loaded into host memory holds its linears as views of the
file's private memory map (quantized_source.place_quantized), pages the kernel can drop and read again, so a
pinned copy would turn an 11.5 GiB Q4_K_M DiT and a 5 GiB text encoder into anonymous memory no 16 GB machine has.
`MappedWeights` keeps FlatWeights' layout (so device buffers and slots are laid out the same) with each tensor's
host side being the tensor it already was: `host` is None, `fill(buffer)` copies the tensors into a buffer (a
pinned staging buffer, which the block streamer then copies on its side stream, as it does for blocks read from
disk; or a device buffer, for a model visiting whole), and `point_to(None)` re-points the parameters at them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .offload import FlatWeights
from .quant_linear import QuantizedLinear


def rests_in_place(model: nn.Module) -> bool:
    """Whether an offloaded model keeps its weights where they are rather than in a pinned copy: it holds quantised
    linears and is in host memory (loaded onto the device, it must be copied off it)."""
    in_host = all(tensor.device.type == "cpu" for tensor in (*model.parameters(), *model.buffers()))
    return in_host and any(isinstance(module, QuantizedLinear) for module in model.modules())


class MappedWeights(FlatWeights):
    """FlatWeights' layout and re-pointing over the module's own tensors as the host side (no copy made)."""

    host = None

    def __init__(self, module: nn.Module, exclude: tuple[nn.Module, ...] = ()):
        self._lay_out(module, exclude)
        # `.data` of a parameter: a tensor of its current storage, unchanged when the parameter is re-pointed.
        self.originals = [getattr(entry.owner, entry.attr)[entry.name.rpartition(".")[2]].data
                          for entry in self.entries]

    def fill(self, buffer: torch.Tensor, non_blocking: bool = False) -> None:
        """Copy every tensor into its place in `buffer` (host staging or a device buffer of the layout's size)."""
        for entry, original in zip(self.entries, self.originals):
            self._view(buffer, entry).copy_(original, non_blocking=non_blocking)

    def copy_to(self, buffer: torch.Tensor, non_blocking: bool = True) -> None:
        self.fill(buffer, non_blocking)

    def point_to(self, buffer: torch.Tensor | None) -> None:
        """Views into `buffer`, or (None) the tensors as loaded."""
        if buffer is not None:
            super().point_to(buffer)
            return
        for entry, original in zip(self.entries, self.originals):
            tensors = getattr(entry.owner, entry.attr)
            key = entry.name.rpartition(".")[2]
            if entry.attr == "_parameters":
                tensors[key].data = original
            else:
                tensors[key] = original
