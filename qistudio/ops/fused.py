"""Shared by the fused kernels of ops/: when one may replace its reference form (inference on a CUDA device with
Triton), and the per-sample key counts the attention kernels take as a device tensor."""

from __future__ import annotations

import functools

import torch

try:
    import triton  # noqa: F401
except ImportError:  # CPU-only installs: the reference forms serve
    triton = None


def triton_inference(*tensors: torch.Tensor) -> bool:
    """Triton is installed, the tensors are on a CUDA device and none needs a gradient (training keeps the
    reference forms, which have the backward)."""
    if triton is None or not tensors[0].is_cuda:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


@functools.lru_cache(maxsize=64)  # a few prompt-length layouts per session
def key_lengths_tensor(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(B,) int32 on `device`: one small host-to-device copy per distinct batch layout, not one per block."""
    return torch.tensor(lengths, dtype=torch.int32, device=device)
