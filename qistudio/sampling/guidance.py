"""Classifier-free guidance: plain (DiffSynth-Studio) or norm-preserving (the official diffusers pipeline)."""

from __future__ import annotations

import torch


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, norm_rescale: bool) -> torch.Tensor:
    """uncond + scale * (cond - uncond); with norm_rescale the result is rescaled, per token, to the norm of cond.

    Tensors are token-major (..., tokens, features): the norm is taken over the feature axis of each token.
    """
    guided = uncond + scale * (cond - uncond)
    if norm_rescale:
        guided = guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
    return guided
