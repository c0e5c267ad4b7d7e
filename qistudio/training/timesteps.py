"""Which sigma each training sample is noised to, and how its loss is weighted: pure functions of a generator.

The reference (DiffSynth-Studio's FlowMatchSFTLoss) builds Qwen-Image's inference schedule with 1000 steps at a
fixed shift mu = 0.8 (terminal stretched to 0.02, so sigmas run 1.0 ... 0.02), draws an index uniformly and
weights the loss by "bsmntw": a Gaussian bump over the timestep t = 1000 sigma, exp(-2 ((t - 500) / 1000)^2),
minus its minimum, normalised to mean 1 over the table (max 1.68 near t = 500, 0 at t = 1000). The reference looks
the weight up by the timestep rounded to bfloat16 (nearest entry); we take the drawn entry itself.

Alternatives (`LossConfig.timestep_sampling`):
  uniform           sigma ~ U(0, 1]
  logit_normal      sigma = sigmoid(N(logit_mean, logit_std)) (SD3's choice)
  resolution_shift  the reference's table, but with the shift inference uses for the sample's size
                    (mu from its token count: 0.5 at 256 tokens, 0.9 at 8192)
The weighting ("bsmntw" or "none") applies to any of them; off the table, the bump is evaluated at the drawn
sigma with the table's normalisation.
"""

from __future__ import annotations

import functools

import torch

from ..sampling.schedule import flow_sigmas, shift_mu
from .config import LossConfig

TABLE_SIZE = 1000


@functools.lru_cache(maxsize=64)
def sigma_table(mu: float) -> torch.Tensor:
    """(1000,) float32 training sigmas, from 1.0 down to 0.02: the 1000-step schedule at shift mu."""
    return flow_sigmas(TABLE_SIZE, 0, mu=mu)[:-1]


def _bump(sigmas: torch.Tensor) -> torch.Tensor:
    timesteps = sigmas.double() * TABLE_SIZE
    return torch.exp(-2 * ((timesteps - TABLE_SIZE / 2) / TABLE_SIZE) ** 2)


@functools.lru_cache(maxsize=64)
def _bump_normalisation(mu: float) -> tuple[float, float]:
    bump = _bump(sigma_table(mu))
    low = float(bump.min())
    return low, TABLE_SIZE / float((bump - low).sum())


def bsmntw_weight(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """The reference's weight at `sigma`, normalised over the mu-table (mean 1 there)."""
    low, scale = _bump_normalisation(mu)
    return ((_bump(sigma) - low) * scale).float()


def draw_sigma(config: LossConfig, generator: torch.Generator, num_image_tokens: int) -> tuple[float, float]:
    """(sigma, loss weight) for one sample of `num_image_tokens` target tokens (the patch grid's cells)."""
    kind = config.timestep_sampling
    mu = config.reference_mu
    if kind in ("reference", "resolution_shift"):
        if kind == "resolution_shift":
            mu = round(shift_mu(num_image_tokens), 6)  # rounded: the table cache keys on it
        index = int(torch.randint(0, TABLE_SIZE, (1,), generator=generator))
        sigma = sigma_table(mu)[index]
    elif kind == "uniform":
        sigma = 1 - torch.rand((), generator=generator)  # (0, 1]
    elif kind == "logit_normal":
        normal = torch.randn((), generator=generator) * config.logit_std + config.logit_mean
        sigma = torch.sigmoid(normal)
    else:
        raise ValueError(f"unknown timestep sampling {kind!r}")
    weight = 1.0 if config.weighting == "none" else float(bsmntw_weight(sigma.reshape(1), mu)[0])
    return float(sigma), weight
