"""FP8 (e4m3) activation quantisation shared by the W8A8 linears, the fused kernels' reference forms and FP8
attention: per token (rows) for matmul inputs, per tensor for attention operands."""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, K) activations -> float8_e4m3fn and (T, 1) float32 per-token scales (absmax / 448)."""
    amax = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    # One division per row, a multiplication per element: fused kernels that divide each element run compute-bound
    # on a power-limited GPU.
    return (x.float() * (FP8_MAX / amax)).to(FP8_DTYPE), amax / FP8_MAX


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> float8_e4m3fn with one descale (1 / scale) as a (1, 1, 1, 1) float32 tensor (absmax maps to 448)."""
    amax = x.abs().amax().float().clamp(min=1e-12)
    scale = FP8_MAX / amax
    return (x.float() * scale).to(FP8_DTYPE), (1.0 / scale).reshape(1, 1, 1, 1)
