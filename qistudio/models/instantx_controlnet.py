"""InstantX's Qwen-Image ControlNet (Union, Inpainting): a few DiT blocks of its own that read the control map.

Design note. This is diffusers' `QwenImageControlNetModel` with its tensor names (`img_in`, `txt_in`, `txt_norm`,
`time_text_embed`, `transformer_blocks.N.*`, `controlnet_blocks.N`, `controlnet_x_embedder`), so its checkpoints
load by identity. Per denoising step it reads what the DiT reads for the target image: the noisy target tokens,
to which the embedded control features are added (`controlnet_x_embedder`, zero at init; 64 features of control
latents, plus 4 of the repaint mask for the Inpainting variant), the text states, the timestep and the same RoPE
tables. Its blocks are our `DiTBlock`; after block k the image stream goes through `controlnet_blocks[k]` (a
linear, zero at init) and becomes sample k. The pipeline adds sample `block_sample_index(i, ...)`, times the
input's scale, to the DiT's target tokens after DiT block i: with 60 DiT blocks and 5 ControlNet blocks, blocks
0-11 get sample 0, 12-23 sample 1, and so on (diffusers' `interval_control`).

Shapes: B batch, N target tokens, L text tokens (right-padded), D = heads * head_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .dit import DiTBlock, DiTConfig, block_sizes_from_shapes
from .layers import RMSNorm, TimeTextEmbed


@dataclass(frozen=True)
class InstantXControlNetConfig:
    num_layers: int = 5  # InstantX/Qwen-Image-ControlNet-Union
    num_heads: int = 24
    head_dim: int = 128
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    additional_in_channels: int = 0  # diffusers' extra_condition_channels: 4 for Inpainting (the mask, patchified)
    text_dim: int = 3584
    mlp_ratio: float = 4.0
    axes_dim: tuple[int, int, int] = (16, 56, 56)
    eps: float = 1e-6

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    def block_config(self) -> DiTConfig:
        """The configuration of its transformer blocks, which are the DiT's."""
        return DiTConfig(num_layers=self.num_layers, num_heads=self.num_heads, head_dim=self.head_dim,
                         in_channels=self.in_channels, out_channels=self.in_channels, text_dim=self.text_dim,
                         mlp_ratio=self.mlp_ratio, axes_dim=self.axes_dim, eps=self.eps)


class QwenImageInstantXControlNet(nn.Module):
    def __init__(self, cfg: InstantXControlNetConfig = InstantXControlNetConfig()):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.time_text_embed = TimeTextEmbed(dim)
        self.txt_norm = RMSNorm(cfg.text_dim, cfg.eps)
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.txt_in = nn.Linear(cfg.text_dim, dim)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg.block_config()) for _ in range(cfg.num_layers)])
        self.controlnet_blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(cfg.num_layers)])
        self.controlnet_x_embedder = nn.Linear(cfg.in_channels + cfg.additional_in_channels, dim)

    def block_samples(
        self,
        image_tokens: torch.Tensor,
        control_tokens: torch.Tensor,
        text_states: torch.Tensor,
        timestep: torch.Tensor,
        rotary,
        text_lengths: list[int] | None = None,
        attention_mask=None,
    ) -> list[torch.Tensor]:
        """One sample (B, N, D) per ControlNet block, unscaled.

        image_tokens (B, N, in_channels): the noisy target tokens the DiT gets at this step.
        control_tokens (B, N, in_channels + additional): patchified control latents [+ mask features].
        text_states (B, L, text_dim), timestep (B,) sigma in [0, 1], rotary: the tables for [target, text];
        text_lengths / attention_mask as for the DiT.
        """
        dtype = self.txt_norm.weight.dtype
        img = self.img_in(image_tokens.to(dtype)) + self.controlnet_x_embedder(control_tokens.to(dtype))
        txt = self.txt_in(self.txt_norm(text_states.to(dtype)))
        temb = self.time_text_embed(timestep, img.dtype)[:, None]  # (B, 1, D), for both streams
        key_lengths = None if text_lengths is None else [img.shape[1] + n for n in text_lengths]

        rotary = rotary.with_joint()
        samples = []
        for block, controlnet_block in zip(self.transformer_blocks, self.controlnet_blocks):
            img, txt = block(img, txt, temb, temb, rotary, key_lengths, attention_mask)
            samples.append(controlnet_block(img))
        return samples


def block_sample_index(block: int, num_dit_layers: int, num_samples: int) -> int:
    """Which sample DiT block `block` adds: diffusers' `block // ceil(num_dit_layers / num_samples)`."""
    return block // math.ceil(num_dit_layers / num_samples)


def instantx_config_from_shapes(shapes: dict[str, tuple[int, ...]], config_json: dict | None = None):
    """Infer the size from the tensor shapes; a diffusers config.json, when given, supplies the RoPE axes."""
    sizes = block_sizes_from_shapes(shapes, config_json)
    return InstantXControlNetConfig(
        **sizes, additional_in_channels=shapes["controlnet_x_embedder.weight"][1] - sizes["in_channels"]
    )
