"""GELU(tanh) of a linear layer's output, with the bias and the GELU in the GEMM's epilogue.

The DiT's MLP up-projection (3072 -> 12288) is followed by a tanh GELU. As two steps, the 12288-wide hidden rows are
written by the GEMM, then read and written again by the GELU: at 1328x1328 with guidance batched that pass is about
0.25 ms of a 7.3 ms block on an H100 (bench/RESULTS.md, fourth pass), and inductor cannot fuse it into cuBLAS's
GEMM. cuBLASLt can: its GELU_BIAS epilogue (tanh approximation, the one the model uses) applies the bias and the
GELU to the float32 accumulator before the single rounding to bf16. PyTorch reaches it through
`torch._addmm_activation(..., use_gelu=True)`, which inductor keeps as one extern call.

The result differs from the reference form (bias, round, GELU, round) by one bf16 rounding fewer, so it is used in
inference on CUDA only; training and CPU keep the reference form, which has the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GELU_tanh(x @ weight.T + bias); x (..., K), weight (N, K), bias (N,) -> (..., N)."""
    if not _can_fuse(x, weight, bias):
        return linear_gelu_reference(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # (T, K)
    out = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)  # (T, N)
    return out.view(*x.shape[:-1], weight.shape[0])


def _can_fuse(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if _disabled or bias is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return False
    # cuBLASLt's epilogue wants the GEMM's own dtype throughout and a bias as long as a row of the output.
    return weight.dtype == bias.dtype == x.dtype and weight.dim() == 2 and bias.dim() == 1 and x.numel() > 0


_disabled = False


def set_fused_linear_gelu(enabled: bool) -> None:
    """Switch the epilogue form off (or back on), for comparisons."""
    global _disabled
    _disabled = not enabled
