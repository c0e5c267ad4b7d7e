"""The fused kernels of ops/ serving a single-stream block (Qwen-Image 2.1): q/k/v RMSNorm + RoPE over one
sequence, and the adaptive LayerNorms without a shift.

The kernels were written for the 20B MMDiT's two streams. A single stream is their joint form with an empty second
stream (every program then reads the first one; ops/qk_norm_rope.py), and a shift-less modulation,
LayerNorm(x) * (1 + scale), is theirs with a zero shift: one (B, 1, D) row of zeros made once per forward by the
caller, read from L2 (ops/ada_norm.py). Same layouts, same roundings: RoPE on interleaved pairs, RMSNorm's
statistic in float32 rounded before the weight, as diffusers' QwenImage21 attention computes them.

Off CUDA, or where a gradient is needed, the block's own eager arithmetic runs unchanged (no join, no zero added),
so the CPU parity tests see the reference's operations one for one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ada_norm import gated_residual_norm, modulated_norm
from .fused import triton_inference
from .norms import rms_normalize
from .qk_norm_rope import joint_qk_norm_rope_fp8, joint_qkv_norm_rope
from .rope import apply_rotation


def qkv_norm_rope(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_weight: torch.Tensor,
                  k_weight: torch.Tensor, eps: tuple[float, float], rotation: torch.Tensor,
                  head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projections (B, S, D) -> query, key, value (B, S, H, head_dim): q and k RMS-normalised per head (weights
    (head_dim,), eps (q's, k's)) and rotated by rotation (S, head_dim / 2, 2); v reshaped. One kernel on CUDA."""
    if triton_inference(query, key, value, q_weight, k_weight):
        none = (query[:, :0], key[:, :0], value[:, :0])  # the empty second stream
        return joint_qkv_norm_rope((query, key, value), none, (q_weight, q_weight), (k_weight, k_weight), eps,
                                   rotation, head_dim)
    return qkv_norm_rope_reference(query, key, value, q_weight, k_weight, eps, rotation, head_dim)


def qkv_norm_rope_reference(query, key, value, q_weight, k_weight, eps: tuple[float, float], rotation,
                            head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`qkv_norm_rope` as the reference's attention computes it, one operation after another (any device)."""
    value = value.unflatten(-1, (-1, head_dim))
    query, key = (rms_normalize(x.unflatten(-1, (-1, head_dim)), e).to(w.dtype) * w
                  for x, w, e in ((query, q_weight, eps[0]), (key, k_weight, eps[1])))
    return (apply_rotation(query.to(value.dtype), rotation), apply_rotation(key.to(value.dtype), rotation), value)


def qk_norm_rope_fp8(proj: torch.Tensor, weight: torch.Tensor, eps: float, rotation: torch.Tensor,
                     head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q or k as `qkv_norm_rope` makes it, in float8_e4m3fn (B, S, H, head_dim) with its descale (1, 1, 1, 1): the
    scale maps the bound sqrt(head_dim) * max|weight| of every normed, rotated head to 448 (no pass over the data),
    so keys made elsewhere with the same weight may share it."""
    return joint_qk_norm_rope_fp8(proj, proj[:, :0], weight, weight, eps, rotation, head_dim)


def scaled_norm(x: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, eps: float,
                fused: bool = True) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale); x (B, S, D), scale (B, 1, D), zero: a zero row like scale (the kernel's
    shift). fused=False keeps the eager form (under W8A8 compiled graphs fuse the quantisation into it)."""
    if fused and triton_inference(x, scale):
        return modulated_norm(x, zero, scale, eps)
    return scaled_norm_reference(x, scale, eps)


def scaled_norm_reference(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """`scaled_norm` with the reference's roundings (LayerNorm's output, then the product)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale)


def gated_residual_scaled_norm(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor, zero: torch.Tensor,
                               scale: torch.Tensor, eps: float,
                               fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate * update, LayerNorm of that * (1 + scale)); x and update (B, S, D), gate, zero, scale (B, 1, D)."""
    if fused and triton_inference(x, update, gate, scale):
        return gated_residual_norm(x, update, gate, zero, scale, eps)
    x = x + gate * update
    return x, scaled_norm_reference(x, scale, eps)
