"""DiffSynth-Studio's Blockwise ControlNet for Qwen-Image: one small residual block per DiT block.

The control image's latents (plus, for the Inpaint variant, one channel marking the region to repaint) are
patchified and projected once (`img_in`); after DiT block i, `controlnet_blocks[i]` reads the target image tokens
and the projected control tokens and returns a residual that the pipeline adds to the image tokens, times the
input's scale. Names follow the released checkpoint (`img_in`, `controlnet_blocks.N.{x_rms,y_rms,input_proj,
output_proj}`), so it loads by identity. `img_in` and every `output_proj` start at zero when trained from
scratch, so a new ControlNet changes nothing until it has learned something.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import RMSNorm


@dataclass(frozen=True)
class ControlNetConfig:
    num_layers: int = 60
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    additional_in_channels: int = 0  # 4 for the Inpaint variant (the repaint mask, patchified)
    dim: int = 3072
    eps: float = 1e-6


class BlockwiseControlBlock(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.x_rms = RMSNorm(dim, eps)
        self.y_rms = RMSNorm(dim, eps)
        self.input_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, image_tokens: torch.Tensor, control_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) each -> the residual for the image tokens (B, N, dim)."""
        hidden = self.x_rms(image_tokens) + self.y_rms(control_tokens)
        return self.output_proj(F.gelu(self.input_proj(hidden)))


class QwenImageBlockwiseControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig = ControlNetConfig()):
        super().__init__()
        self.config = cfg
        self.img_in = nn.Linear(cfg.in_channels + cfg.additional_in_channels, cfg.dim)
        self.controlnet_blocks = nn.ModuleList([BlockwiseControlBlock(cfg.dim, cfg.eps) for _ in range(cfg.num_layers)])

    def zero_init(self) -> "QwenImageBlockwiseControlNet":
        """The starting point for training: every output (img_in, output_proj) at zero."""
        with torch.no_grad():
            for layer in [self.img_in, *(block.output_proj for block in self.controlnet_blocks)]:
                layer.weight.zero_()
                layer.bias.zero_()
        return self

    def project(self, control_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, in_channels [+ additional]) patchified control latents -> (B, N, dim), computed once per call."""
        dtype = self.img_in.weight.dtype if self.img_in.weight.is_floating_point() else control_tokens.dtype
        return self.img_in(control_tokens.to(dtype))

    def residual(self, index: int, image_tokens: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        block = self.controlnet_blocks[index]
        return block(image_tokens.to(projected.dtype), projected).to(image_tokens.dtype)


def controlnet_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> ControlNetConfig:
    dim, in_features = shapes["img_in.weight"]
    num_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("controlnet_blocks."))
    return ControlNetConfig(num_layers=num_layers, in_channels=64, additional_in_channels=in_features - 64, dim=dim)
