"""What to make: one generation request, validated before any model runs."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from PIL import Image

from .imageio import load_image, round_size


@dataclass
class GenerationRequest:
    prompts: list[str]
    negative_prompt: str = ""
    cfg_scale: float = 4.0
    cfg_norm_rescale: bool = True
    num_inference_steps: int = 30
    height: int = 1328
    width: int = 1328
    num_images: int = 1  # per prompt
    seed: int | None = None
    rand_device: str = "cpu"
    noise: torch.Tensor | None = None  # (batch, 16, height/8, width/8)
    input_image: Image.Image | None = None
    denoising_strength: float = 1.0
    sigmas: list[float] | None = None
    exponential_shift_mu: float | None = None
    tiled: bool = False
    tile_size: int | tuple = 128
    tile_stride: int | tuple = 64
    cfg_batch: bool = True  # run both guidance branches as one batched DiT call
    callback: Callable | None = None
    progress_bar_cmd: Callable = field(default=lambda it: it)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.prompts) * self.num_images

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8


def build_request(prompt, **kwargs) -> GenerationRequest:
    """Normalise and check the caller's arguments; every error a caller can cause is raised here."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    request = GenerationRequest(prompts=prompts, **kwargs)
    if not isinstance(request.num_inference_steps, int) or request.num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {request.num_inference_steps!r}")
    if request.num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {request.num_images}")
    if not 0 < request.denoising_strength <= 1:
        raise ValueError(f"denoising_strength must be in (0, 1], got {request.denoising_strength}")
    if request.denoising_strength < 1 and request.input_image is None:
        raise ValueError(
            f"denoising_strength={request.denoising_strength} needs input_image (image-to-image); "
            "without one, use denoising_strength=1"
        )
    request.height, request.width = round_size(request.height, request.width)
    if request.input_image is not None:
        request.input_image = load_image(request.input_image)
    if request.seed is None:
        request.seed = random.randrange(2**31)
    if request.noise is not None:
        expected = (request.batch_size, 16, *request.latent_size)
        if tuple(request.noise.shape) != expected:
            raise ValueError(f"noise must have shape {expected} (batch, 16, height/8, width/8), "
                             f"got {tuple(request.noise.shape)}")
    return request
