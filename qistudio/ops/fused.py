"""When a fused Triton kernel of ops/ may replace its reference form: inference on a CUDA device with Triton."""

from __future__ import annotations

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
