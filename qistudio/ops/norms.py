"""Normalisation arithmetic shared by modules and fused kernels' reference forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last axis, in float32 (RMSNorm without its scale)."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim without affine weights. Eager: F.layer_norm. Compiled: its values by two passes
    in float32 (mean, then the mean square of the centred values), which inductor fuses as plain sums; F.layer_norm
    compiles to a Welford reduction with a division per element, which made the DiT's norm kernels compute-bound
    (twice the time of reading the rows) on a power-limited H100."""
    if not torch.compiler.is_compiling():
        return F.layer_norm(x, x.shape[-1:], eps=eps)
    x32 = x.float()
    centred = x32 - x32.mean(dim=-1, keepdim=True)
    variance = (centred * centred).mean(dim=-1, keepdim=True)
    return (centred * torch.rsqrt(variance + eps)).to(x.dtype)
