"""The Euler sampler of the flow ODE, over any velocity function: it knows nothing of models or features."""

from __future__ import annotations

from typing import Callable

import torch

# velocity_fn(x, sigma, step_index) -> velocity, same shape as x
VelocityFn = Callable[[torch.Tensor, float, int], torch.Tensor]
# callback(step_index, sigma, x_next) -> None
StepCallback = Callable[[int, float, torch.Tensor], None]


def sample_euler(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: StepCallback | None = None,
    progress: Callable = lambda it: it,
    step_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Integrate x from sigmas[0] to sigmas[-1]: x <- x + v * (sigma_next - sigma), in float32, cast back.

    step_fn(x, velocity, i) may replace the velocity before the step (inpainting blends it there).
    """
    for i in progress(range(len(sigmas) - 1)):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        velocity = velocity_fn(x, sigma, i)
        if step_fn is not None:
            velocity = step_fn(x, velocity, i)
        x = (x.float() + velocity.float() * (sigma_next - sigma)).to(velocity.dtype)
        if callback is not None:
            callback(i, sigma, x)
    return x
