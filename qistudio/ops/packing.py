"""Latents <-> tokens: 2x2 patchify in the reference's layout (feature index = channel*4 + dy*2 + dx)."""

from __future__ import annotations

import torch


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4), row-major over the patch grid."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} must be even to patchify 2x2")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpatchify(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h*w, C*4) on an h x w patch grid -> (B, C, 2h, 2w)."""
    b, n, f = tokens.shape
    if n != height * width:
        raise ValueError(f"{n} tokens do not fill a {height}x{width} patch grid")
    x = tokens.reshape(b, height, width, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, f // 4, height * 2, width * 2)
