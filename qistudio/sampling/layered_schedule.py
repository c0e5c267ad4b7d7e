"""Qwen-Image-Layered's sigma schedule: a linear time shift whose strength grows with the input image's size.

The grid is 1, 1 - 1/N, ..., 1/N (N steps), shifted linearly, sigma = mu / (mu + (1/t - 1)), with
mu = sqrt(input-image tokens / 256): the shift of a 256-token (256x256 pixel) image is 1, of a 640x640 one 2.5. No
terminal stretch; a final 0 is appended. These are diffusers' QwenImageLayeredPipeline (mu) and the Layered
scheduler_config.json (time_shift_type "linear", shift_terminal false, in diffusers/Qwen-Image-Layered-modular).
"""

from __future__ import annotations

import math

import torch

BASE_TOKENS = 256  # (256 / 16) ** 2: the tokens of a 256x256 image


def layered_mu(num_condition_tokens: int) -> float:
    return math.sqrt(num_condition_tokens / BASE_TOKENS)


def layered_sigmas(num_steps: int, num_condition_tokens: int, mu: float | None = None) -> torch.Tensor:
    """(num_steps + 1,) float32 sigmas ending in 0; `mu` overrides the size rule."""
    mu = layered_mu(num_condition_tokens) if mu is None else mu
    grid = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)[:-1]
    sigmas = mu / (mu + (1 / grid - 1))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()
