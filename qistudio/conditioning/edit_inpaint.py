"""Edit inpainting: an Edit model repaints only the masked region of the image it edits; the rest is kept.

Design note. This is diffusers' QwenImageEditInpaintPipeline, matched step for step. The image being edited (a
row's last edit image, the one the output follows) is also the image being inpainted: its VAE latents x0 are the
edit condition (appended tokens, as in any edit) and the target the unmasked region follows. Sampling starts from
(1 - s0) x0 + s0 noise; after every Euler step the latents outside the mask are replaced by x0 noised to the next
sigma with the same noise, (1 - s_next) x0 + s_next noise (x0 itself after the last step). The mask is read as
diffusers reads it: resized to the output size (Lanczos), grey, binarised at 0.5 (white = repaint), then taken
to the latent grid by nearest neighbour. Unlike DiffSynth-Studio's image inpainting (input_image + inpaint_mask,
which blends velocities towards the input), the blend happens on the latents after the step; for a binary mask
the two agree, and the blend below is that latent blend written as the velocity our sampler takes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..validation import InputError
from .edit import EditRow


def edit_inpaint_size(rows: list[EditRow], auto_resize: bool) -> tuple[int, int]:
    """(height, width) of the output: the latent copy of each row's last edit image, which must agree."""
    sizes = {row.latent_images(auto_resize)[-1].size for row in rows}
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
        raise InputError(f"edit inpainting repaints each row's last edit image, and these have different working "
                         f"sizes ({listed}); inpaint images of one aspect ratio per call")
    width, height = sizes.pop()
    return height, width


def edit_inpaint_mask(mask: Image.Image, height: int, width: int, device) -> torch.Tensor:
    """(1, 1, height/8, width/8) in {0, 1}, 1 = repaint, by diffusers' rule (see the design note)."""
    resized = mask.resize((width, height), Image.LANCZOS).convert("L")
    binary = torch.from_numpy((np.asarray(resized, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32))
    return F.interpolate(binary[None, None], size=(height // 8, width // 8)).to(device)


def edit_inpaint_start(conditions: list[list[torch.Tensor]], noise: torch.Tensor,
                       sigma0: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, start): the latents (B, 16, h, w) of each row's last edit image, and them noised to sigma0."""
    x0 = torch.stack([row[-1] for row in conditions]).to(noise.dtype)
    if x0.shape != noise.shape:
        raise InputError(f"edit inpainting: the edited image's latents {tuple(x0.shape[-2:])} differ from the output "
                         f"grid {tuple(noise.shape[-2:])}; leave height and width unset (the output takes the edit "
                         "image's working size)")
    return x0, (1 - sigma0) * x0 + sigma0 * noise


def renoised_blend_step(x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor):
    """step_fn for sample_euler: after the step, x = m x_stepped + (1 - m) ((1 - s_next) x0 + s_next noise).

    Written as a velocity: v' = m v + (1 - m) (target_next - x) / (s_next - s), float32.
    """
    x0, noise, mask = x0.float(), noise.float(), mask.float()

    def step(x: torch.Tensor, velocity: torch.Tensor, i: int) -> torch.Tensor:
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        target = x0 if sigma_next == 0 else (1 - sigma_next) * x0 + sigma_next * noise
        kept = (target - x.float()) / (sigma_next - sigma)
        return (velocity.float() * mask + kept * (1 - mask)).to(velocity.dtype)

    return step
