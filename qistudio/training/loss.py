"""The flow-matching loss of one sample: noise to sigma, predict the velocity, squared error in float32 x weight.

    x_t = (1 - sigma) x0 + sigma noise,  target = noise - x0,  loss = weight * mean((v(x_t, sigma) - target)^2)

The velocity comes from a `Denoiser`: the DiT with the loaded ControlNets, one module, so that accelerate's DDP
wrapper holds whichever of them trains and its forward covers the whole prediction. The ControlNet residuals are
the pipeline's own (conditioning.control_residuals) at its single-step window (a training step is step 0 of 1,
as the reference's progress_id=0, num_inference_steps=1).
The error is taken over tokens (patchified latents), a permutation of the latent pixels, so the mean is the same.

Qwen-Image-Layered's and Qwen-Image 2.1's samples (training/layered.py, qwen21.py) pack their own latents into
tokens (`pack`: frames one after another; 2.1's unpatched rows) and run the DiT their own way (`velocity`); the
loss, sigma and noise are the same for every member.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..conditioning.control_residuals import ControlResiduals
from ..models.dit import QwenImageDiT
from ..models.dit21 import QwenImage21DiT
from ..ops.packing import patchify
from .encode import EncodedSample


class Denoiser(nn.Module):
    """velocity(noisy target tokens, timestep, sample): the DiT over [target | condition tokens] with the
    sample's ControlNet residuals added after each block."""

    def __init__(self, dit: QwenImageDiT, controlnets=()):
        super().__init__()
        self.dit = dit
        self.controlnets = nn.ModuleList(controlnets)

    def forward(self, tokens: torch.Tensor, timestep: torch.Tensor, sample: EncodedSample) -> torch.Tensor:
        """tokens (B, N, 64) patchified noisy latents, timestep (B,) sigma -> (B, N, 64) velocity."""
        if not isinstance(sample, EncodedSample):  # Layered, 2.1: the sample knows how its DiT is called
            return sample.velocity(self.dit, tokens, timestep)
        seq = sample.sequence
        hook = None
        if sample.controls:
            # Projected with gradients when the ControlNet trains (and the graph is on).
            residuals = ControlResiduals(sample.controls, list(self.controlnets), sample.target_grid, seq.text, 1,
                                         self.dit.config.num_layers, project_with_grad=torch.is_grad_enabled())
            hook = residuals.hook(0, tokens, timestep)
        if seq.condition_tokens is not None:
            tokens = torch.cat([tokens, seq.condition_tokens.to(tokens.dtype)], dim=1)
        return self.dit(tokens, seq.text.states, timestep, seq.rotary, seq.text_lengths,
                        num_target_tokens=seq.num_target_tokens, condition_token_mask=seq.condition_token_mask,
                        attention_mask=seq.attention_mask, block_hook=hook)


def predict(model, sample: EncodedSample, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(1, N, 64) velocity of the noisy latents (1, 16, h, w) at sigma (a 0-d float32 tensor).

    `model` is a Denoiser or its accelerate/DDP wrapper; a bare DiT is taken as a Denoiser without ControlNets.
    """
    if isinstance(model, (QwenImageDiT, QwenImage21DiT)):
        model = Denoiser(model)
    timestep = sigma.reshape(1).expand(noisy.shape[0])
    return model(pack(sample, noisy), timestep, sample)


def pack(sample, latents: torch.Tensor) -> torch.Tensor:
    """Latents of the sample's shape -> the DiT's tokens: 2x2 patches, or the sample's own packing."""
    return patchify(latents) if isinstance(sample, EncodedSample) else sample.pack(latents)


def flow_matching_loss(model, sample: EncodedSample, sigma: float, noise: torch.Tensor, weight: float) -> torch.Tensor:
    """Scalar float32 loss; `noise` has the latents' shape."""
    x0 = sample.latents
    sigma_t = torch.tensor(sigma, dtype=torch.float32, device=x0.device)
    noisy = ((1 - sigma_t) * x0.float() + sigma_t * noise.float()).to(x0.dtype)
    target = pack(sample, noise.float() - x0.float())  # (1, N, 64)
    return F.mse_loss(predict(model, sample, noisy, sigma_t).float(), target) * weight


def fixed_noise_loss(model, sample: EncodedSample, sigmas: list[float], seed: int) -> float:
    """Unweighted loss averaged over `sigmas` with noise drawn from `seed`: comparable across steps and runs."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for sigma in sigmas:
            noise = torch.randn(sample.latents.shape, generator=generator).to(sample.latents)
            total += float(flow_matching_loss(model, sample, sigma, noise, 1.0))
    return total / len(sigmas)
