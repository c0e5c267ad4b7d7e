"""The flow-matching loss of one sample: noise to sigma, predict the velocity, squared error in float32 x weight.

    x_t = (1 - sigma) x0 + sigma noise,  target = noise - x0,  loss = weight * mean((v(x_t, sigma) - target)^2)

`dit` may be the DiT itself or its accelerate/DDP wrapper: it is called with the DiT's own forward arguments.
The error is taken over tokens (patchified latents), a permutation of the latent pixels, so the mean is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.packing import patchify
from .encode import EncodedSample


def flow_matching_loss(dit, sample: EncodedSample, sigma: float, noise: torch.Tensor, weight: float) -> torch.Tensor:
    """Scalar float32 loss; `noise` has the latents' shape."""
    x0 = sample.latents
    sigma_t = torch.tensor(sigma, dtype=torch.float32, device=x0.device)
    noisy = ((1 - sigma_t) * x0.float() + sigma_t * noise.float()).to(x0.dtype)
    target = patchify(noise.float() - x0.float())  # (1, N, 64)
    seq = sample.sequence
    tokens = patchify(noisy)
    if seq.condition_tokens is not None:
        tokens = torch.cat([tokens, seq.condition_tokens.to(tokens.dtype)], dim=1)
    timestep = sigma_t.reshape(1).expand(x0.shape[0])
    prediction = dit(tokens, seq.text.states, timestep, seq.rotary, seq.text_lengths,
                     num_target_tokens=seq.num_target_tokens, condition_token_mask=seq.condition_token_mask,
                     attention_mask=seq.attention_mask)
    return F.mse_loss(prediction.float(), target) * weight


def fixed_noise_loss(dit, sample: EncodedSample, sigmas: list[float], seed: int) -> float:
    """Unweighted loss averaged over `sigmas` with noise drawn from `seed`: comparable across steps and runs."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for sigma in sigmas:
            noise = torch.randn(sample.latents.shape, generator=generator).to(sample.latents)
            total += float(flow_matching_loss(dit, sample, sigma, noise, 1.0))
    return total / len(sigmas)
