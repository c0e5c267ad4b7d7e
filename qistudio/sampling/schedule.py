"""Qwen-Image's flow-matching schedule as pure functions: sigma grids, resolution-dependent shift, terminal stretch.

The grid runs from `strength` down to strength/N (N = steps); it is shifted exponentially with mu growing linearly
in the image token count (0.5 at 256 tokens, 0.9 at 8192), then stretched so the last sigma is exactly 0.02. A
final 0 is appended: the sampler integrates from sigmas[i] to sigmas[i+1].
"""

from __future__ import annotations

import math

import torch

from ..validation import InputError, number_list

BASE_TOKENS, MAX_TOKENS = 256, 8192
BASE_SHIFT, MAX_SHIFT = 0.5, 0.9
SHIFT_TERMINAL = 0.02


def shift_mu(num_image_tokens: int) -> float:
    """mu of the exponential shift for an image of `num_image_tokens` tokens (patch grid cells)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return BASE_SHIFT + (num_image_tokens - BASE_TOKENS) * slope


def exponential_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float = SHIFT_TERMINAL) -> torch.Tensor:
    one_minus = 1 - sigmas
    if one_minus[-1] == 0:
        # A one-step full-strength schedule is just [1]: nothing to stretch. (diffusers and DiffSynth-Studio
        # divide 0 by 0 here and sample NaN.)
        return sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def flow_sigmas(
    num_steps: int,
    num_image_tokens: int,
    denoising_strength: float = 1.0,
    mu: float | None = None,
    shift_terminal: float | None = SHIFT_TERMINAL,
) -> torch.Tensor:
    """(num_steps + 1,) float32 sigmas, ending in 0.

    denoising_strength scales the unshifted grid (DiffSynth-Studio's meaning): all num_steps run, starting from the
    shifted value of `strength`. mu defaults to `shift_mu(num_image_tokens)`.
    """
    grid = torch.linspace(denoising_strength, 0, num_steps + 1, dtype=torch.float64)[:-1]
    sigmas = exponential_shift(grid, shift_mu(num_image_tokens) if mu is None else mu)
    if shift_terminal:
        sigmas = stretch_to_terminal(sigmas, shift_terminal)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def custom_sigmas(sigmas) -> torch.Tensor:
    """A caller's sigmas, used verbatim (no shift, no stretch); a final 0 is appended when missing."""
    s = torch.tensor(number_list("sigmas", sigmas), dtype=torch.float32)
    if not bool(((s >= 0) & (s <= 1)).all()) or not bool((s[1:] <= s[:-1]).all()):
        raise InputError(f"sigmas must decrease within [0, 1], got {s.tolist()}")
    return s if s[-1] == 0 else torch.cat([s, s.new_zeros(1)])


LIGHTNING_MU = math.log(3.0)  # lightx2v's Lightning LoRAs were distilled at a fixed shift of 3


class FlowMatchScheduler:
    """The seed's (DiffSynth-Studio 2.x) scheduler object: which sigma grid a pipeline samples on.

    "Qwen-Image": resolution-dependent exponential shift, last sigma stretched to 0.02 (the default).
    "Qwen-Image-Lightning": fixed mu = ln 3 and no terminal stretch, for the 4- and 8-step Lightning LoRAs
    (4 steps: 1.0, 0.9, 0.75, 0.5). Use it as `pipe.scheduler = FlowMatchScheduler("Qwen-Image-Lightning")`.
    """

    TEMPLATES = {
        "Qwen-Image": dict(mu=None, shift_terminal=SHIFT_TERMINAL),
        "Qwen-Image-Lightning": dict(mu=LIGHTNING_MU, shift_terminal=None),
    }

    def __init__(self, template: str = "Qwen-Image"):
        if template not in self.TEMPLATES:
            raise ValueError(f"unknown scheduler template {template!r}; choose one of {sorted(self.TEMPLATES)}")
        self.template = template
        self.mu = self.TEMPLATES[template]["mu"]
        self.shift_terminal = self.TEMPLATES[template]["shift_terminal"]

    def __repr__(self) -> str:
        return f"FlowMatchScheduler({self.template!r})"

    def sigmas(self, num_steps: int, num_image_tokens: int, denoising_strength: float = 1.0,
               mu: float | None = None) -> torch.Tensor:
        """(num_steps + 1,) sigmas ending in 0; an explicit `mu` (exponential_shift_mu) overrides the template's."""
        mu = mu if mu is not None else self.mu
        return flow_sigmas(num_steps, num_image_tokens, denoising_strength, mu, self.shift_terminal)
