"""The few layers the DiT and its relatives share: RMSNorm, the GELU(tanh) MLP, the timestep embedding."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.linear_gelu import linear_gelu
from ..ops.norms import rms_normalize


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale; the statistic is computed in float32, the result cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps).to(self.weight.dtype) * self.weight


class GELUProj(nn.Module):
    """Linear then tanh-approximated GELU; a module so that the checkpoint's `net.0.proj` name holds."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.proj
        # A plain linear without hooks (a runtime LoRA hooks it) may take the GELU into its GEMM's epilogue.
        if type(proj) is nn.Linear and not proj._forward_hooks and not proj._forward_pre_hooks:
            return linear_gelu(x, proj.weight, proj.bias)
        return F.gelu(proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """dim -> hidden -> dim MLP; `net` indices follow the checkpoint (net.0.proj, net.1 dropout slot, net.2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.net[2]
        if hasattr(down, "forward_after_gelu"):  # an FP8 linear: it may fuse the GELU into its input quantisation
            return down.forward_after_gelu(self.net[0].proj(x))
        return down(self.net[0](x))


def sinusoidal_embedding(timestep: torch.Tensor, dim: int = 256, scale: float = 1000.0) -> torch.Tensor:
    """(B,) timesteps in [0, 1] -> (B, dim) float32 [cos, sin] features of `scale * timestep`."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angle = scale * (timestep.float()[:, None] * torch.exp(exponent)[None, :])
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class TimeTextEmbed(nn.Module):
    """Holds the timestep MLP under the checkpoint's `time_text_embed.timestep_embedder` name."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.timestep_embedder = TimestepEmbedder(frequency_dim, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The reference rounds the timestep to the compute dtype before embedding it; so do we.
        features = sinusoidal_embedding(timestep.to(dtype), self.frequency_dim)
        return self.timestep_embedder(features.to(dtype))
