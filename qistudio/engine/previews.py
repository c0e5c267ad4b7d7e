"""Small previews of latents while a job runs: the model's own VAE, linearised once per worker.

Design note. Decoding every step would cost as much as the step. Instead each worker fits, once after loading, the
least-squares affine map from a latent pixel's C channels to the mean colour of the f x f pixels the VAE decodes
it into (one small decode of random latents), then previews a latent with that C x 3 matrix: a (h/f, w/f) picture,
shrunk to at most PREVIEW_SIDE pixels a side. It shows the current, still noisy latent, which sharpens into the
result over the last steps. Fitting from the loaded VAE needs no table per model family: Qwen-Image's VAE has
C = 16, f = 8; Qwen-Image 2.1's C = 64, f = 16, and decodes RGBA, whose colour channels are fitted.
"""

from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PREVIEW_SIDE = 64


def _fit_side(channels: int) -> int:
    """The side of the random latent fitted: at least 8, and about twice as many latent pixels (samples) as the
    channels + 1 unknowns per colour (16 channels: 8x8, 64 samples; 64 channels: 12x12, 144)."""
    return max(8, math.isqrt(2 * (channels + 1)) + 1)


def _decoder(pipe) -> tuple[int, int, Callable[[torch.Tensor], Image.Image]]:
    """(latent channels C, pixels per latent pixel f, decode: latents (1, C, n, n) -> the image of n f pixels a
    side) of the pipeline's VAE."""
    from ..pipeline21 import decode21, is_qwen21

    if is_qwen21(pipe.components):
        from ..request21 import build_request21

        def decode(latents):
            side = latents.shape[-1] * 16
            return decode21(pipe.components, build_request21("preview", height=side, width=side), latents)[0]

        return pipe.components.dit.config.in_channels, 16, decode
    from ..pipeline import decode as decode_latents
    from ..request import build_request

    def decode(latents):
        side = latents.shape[-1] * 8
        return decode_latents(pipe.components, build_request("preview", height=side, width=side), latents)[0]

    return 16, 8, decode


class LatentPreviewer:
    def __init__(self, weights: torch.Tensor, bias: torch.Tensor):
        self.weights, self.bias = weights, bias  # (C, 3), (3,) in [-1, 1] colour units

    @classmethod
    def fit(cls, pipe) -> "LatentPreviewer":
        channels, factor, decode = _decoder(pipe)
        side = _fit_side(channels)
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(1, channels, side, side, generator=generator)
        image = decode(latents.to(pipe.device, pipe.torch_dtype)).convert("RGB")  # 2.1: its colours, not alpha
        colours = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        targets = F.avg_pool2d(colours, factor)[0].flatten(1).T  # (side², 3)
        inputs = torch.cat([latents[0].flatten(1).T, torch.ones(side**2, 1)], dim=1)  # (side², C + 1)
        solution = torch.linalg.lstsq(inputs.double(), targets.double()).solution.float()
        return cls(solution[:channels], solution[channels])

    def image(self, latent: torch.Tensor) -> Image.Image:
        """(C, h, w) -> an RGB picture of at most PREVIEW_SIDE a side."""
        latent = latent.detach().float().cpu()
        while max(latent.shape[1:]) > PREVIEW_SIDE:
            latent = F.avg_pool2d(latent[None], 2, ceil_mode=True)[0]
        rgb = torch.einsum("chw,cd->hwd", latent, self.weights) + self.bias
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        return Image.fromarray(pixels)

    def png(self, latent: torch.Tensor) -> bytes:
        buffer = io.BytesIO()
        self.image(latent).save(buffer, format="PNG")
        return buffer.getvalue()
