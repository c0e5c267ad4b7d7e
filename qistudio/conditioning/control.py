"""Spatial control inputs: Blockwise ControlNet maps, the inpainting mask, the In-Context control map.

A `ControlNetInput` is a value passed to the pipeline (the seed's name and fields). Its control image is VAE-encoded
at the output size; for the Inpaint ControlNet the region to repaint is blacked out in the image and its mask is
appended as a 17th latent channel (1 - mask), as DiffSynth-Studio trained it. The projection by the ControlNet's
`img_in` runs once per call; after each DiT block the residuals of the inputs active at that step are added to the
target image tokens, times their scales.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..ops.packing import patchify

CONTEXT_TRIGGER = "Context_Control. "


@dataclass
class ControlNetInput:
    """One control map for a loaded Blockwise ControlNet (`controlnet_id`: its index among the loaded ones).

    Active while the denoising progress (1 at the first step, 0 at the last) lies between `end` and `start`.
    `inpaint_mask` (white = repaint) is for the Inpaint ControlNet.
    """

    image: Image.Image | str | None = None
    scale: float = 1.0
    start: float = 1.0
    end: float = 0.0
    controlnet_id: int = 0
    inpaint_mask: Image.Image | str | None = None
    inpaint_image: Image.Image | str | None = None  # the seed's field; Qwen's ControlNets read `image`

    def active(self, step: int, num_steps: int) -> bool:
        # DiffSynth-Studio's rule, float for float: a single step has progress 0 (the last step), not 1.
        progress = (num_steps - 1 - step) / max(num_steps - 1, 1)
        return self.end - 1e-4 <= progress <= self.start + 1e-4


def fit_image(image: Image.Image, width: int, height: int, what: str) -> Image.Image:
    """`image` at the output size; a different size is resized, with a note."""
    if image.size != (width, height):
        warnings.warn(f"{what} is {image.width}x{image.height}; resized to the output's {width}x{height}", stacklevel=4)
        image = image.resize((width, height), Image.LANCZOS)
    return image


def _mask_values(mask: Image.Image) -> torch.Tensor:
    """(H, W) float32 in [0, 1]: the RGB mean of a mask image (white = 1)."""
    return torch.from_numpy(np.asarray(mask.convert("RGB"), dtype=np.float32) / 255.0).mean(dim=-1)


def mask_tensor(mask: Image.Image, height: int, width: int, device) -> torch.Tensor:
    """(1, 1, height, width) in [0, 1]: the Inpaint ControlNet's mask channel before `1 - mask`.

    Read at full size, then `interpolate`'s default (nearest) to the latent grid, as DiffSynth-Studio trained it.
    """
    return F.interpolate(_mask_values(mask)[None, None], size=(height, width)).to(device)


def inpaint_mask_tensor(mask: Image.Image, height: int, width: int, device) -> torch.Tensor:
    """(1, 1, height, width) in [0, 1]: the pipeline-level inpainting mask (1 = repaint).

    DiffSynth-Studio's rule: the mask image is resized to the latent grid by PIL (its default, bicubic, which
    averages each 8x8 block with soft edges), then read; a different rule from the ControlNet's `mask_tensor`.
    """
    return _mask_values(mask.convert("RGB").resize((width, height)))[None, None].to(device)


def blacked_out(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The control image with the region to repaint (mask brighter than mid-grey) set to black.

    A mask of another size is resized with PIL's default (bicubic) first, as DiffSynth-Studio does.
    """
    pixels = np.asarray(image.convert("RGB")).copy()
    inside = np.asarray(mask.convert("RGB").resize(image.size), dtype=np.float32).mean(axis=-1) > 127.5
    pixels[inside] = 0
    return Image.fromarray(pixels)


def control_tokens(latents: torch.Tensor, inpaint_mask: torch.Tensor | None) -> torch.Tensor:
    """(1, 16, h, w) latents [+ (1, 1, h, w) mask] -> (1, h/2 * w/2, 64 or 68) patchified control features."""
    if inpaint_mask is not None:
        latents = torch.cat([latents, (1 - inpaint_mask).to(latents.dtype)], dim=1)
    return patchify(latents)


def blurred_mask(mask: torch.Tensor, blur_size: int | None, blur_sigma: float | None) -> torch.Tensor:
    """The inpainting mask softened as the reference does (torchvision GaussianBlur, kernel 2 * size + 1)."""
    if not blur_size or not blur_sigma:
        return mask
    from torchvision.transforms import GaussianBlur

    return GaussianBlur(kernel_size=2 * blur_size + 1, sigma=blur_sigma)(mask)


def with_context_trigger(prompts: list[str]) -> list[str]:
    """The In-Context LoRA was trained with this prefix; add it where missing (said once)."""
    missing = [p for p in prompts if not p.startswith(CONTEXT_TRIGGER)]
    if missing:
        warnings.warn(f"context_image: prompts get the In-Context trigger {CONTEXT_TRIGGER.strip()!r} prepended",
                      stacklevel=4)
    return [p if p.startswith(CONTEXT_TRIGGER) else CONTEXT_TRIGGER + p for p in prompts]
