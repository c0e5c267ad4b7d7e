"""Small previews of latents while a job runs: the model's own VAE, linearised once per worker.

Design note. Decoding every step would cost as much as the step. Instead each worker fits, once after loading, the
least-squares affine map from a latent pixel's 16 channels to the mean colour of the 8x8 pixels the VAE decodes
it into (one small decode of random latents), then previews a latent with that 16x3 matrix: a (h/8, w/8) picture,
shrunk to at most PREVIEW_SIDE pixels a side. It shows the current, still noisy latent, which sharpens into the
result over the last steps. Fitting from the loaded VAE needs no table per model family.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PREVIEW_SIDE = 64
_FIT_LATENT = 8  # an 8x8 latent (64x64 pixels): 64 samples for 17 unknowns per colour


class LatentPreviewer:
    def __init__(self, weights: torch.Tensor, bias: torch.Tensor):
        self.weights, self.bias = weights, bias  # (16, 3), (3,) in [-1, 1] colour units

    @classmethod
    def fit(cls, pipe) -> "LatentPreviewer":
        from ..pipeline import decode
        from ..request import build_request

        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 16, _FIT_LATENT, _FIT_LATENT, generator=generator)
        side = _FIT_LATENT * 8
        request = build_request("preview", height=side, width=side)
        image = decode(pipe.components, request, latents.to(pipe.device, pipe.torch_dtype))[0]
        colours = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        targets = F.avg_pool2d(colours, 8)[0].flatten(1).T  # (64, 3)
        inputs = torch.cat([latents[0].flatten(1).T, torch.ones(_FIT_LATENT**2, 1)], dim=1)  # (64, 17)
        solution = torch.linalg.lstsq(inputs.double(), targets.double()).solution.float()
        return cls(solution[:16], solution[16])

    def image(self, latent: torch.Tensor) -> Image.Image:
        """(16, h, w) -> an RGB picture of at most PREVIEW_SIDE a side."""
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
