"""Spatial control inputs: ControlNet maps (Blockwise, InstantX), the inpainting mask, the In-Context control map.

A `ControlNetInput` is a value passed to the pipeline (the seed's name and fields). Its control image is VAE-encoded
at the output size; for an Inpaint ControlNet the region to repaint is blacked out in the image and its mask is
appended as a 17th latent channel (1 - mask), each family by its own rule: DiffSynth-Studio's for the Blockwise
Inpaint ControlNet, diffusers' for InstantX's Inpainting one. control_residuals.py turns the encoded inputs into
what is added after each DiT block.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models.instantx_controlnet import QwenImageInstantXControlNet
from ..ops.packing import patchify

CONTEXT_TRIGGER = "Context_Control. "


@dataclass
class ControlNetInput:
    """One control map for a loaded ControlNet (`controlnet_id`: its index among the loaded ones).

    Active while the denoising progress (1 at the first step, 0 at the last) lies between `end` and `start`:
    for a Blockwise ControlNet DiffSynth-Studio's rule (`active`), for an InstantX one diffusers' (`active_span`).
    `inpaint_mask` (white = repaint) is for the Inpaint / Inpainting ControlNets.
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

    def active_span(self, step: int, num_steps: int) -> bool:
        """diffusers' rule (InstantX ControlNets): step i spans the progress from 1 - i/N down to 1 - (i+1)/N and
        is active when that whole span lies within [end, start].

        This is diffusers' `control_guidance_start = 1 - start`, `control_guidance_end = 1 - end` (its keep test
        `not (i/N < s or (i+1)/N > e)`), with 1e-4 of slack so that 1 - start rounding below s changes nothing.
        """
        return step / num_steps >= 1 - self.start - 1e-4 and (step + 1) / num_steps <= 1 - self.end + 1e-4


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


def instantx_inpaint_image(image: Image.Image, mask: Image.Image, height: int, width: int,
                           device) -> tuple[Image.Image, torch.Tensor]:
    """diffusers' rule for InstantX's Inpainting ControlNet: (the image with the region to repaint black,
    (1, 1, height, width) mask channel before `1 - mask`).

    The mask (at the image's size) is read as PIL grey ("L"), binarised at 0.5, the image set to black (-1 once
    normalised) where it is 1, and the mask taken to the latent grid by `interpolate`'s default (nearest).
    """
    grey = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    repaint = grey >= 0.5
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[repaint] = 0
    binary = torch.from_numpy(repaint.astype(np.float32))[None, None]
    return Image.fromarray(pixels), F.interpolate(binary, size=(height, width)).to(device)


def control_image_and_mask(controlnet, control: ControlNetInput, width: int, height: int,
                           device) -> tuple[Image.Image, torch.Tensor | None]:
    """The image to VAE-encode for one input, at the output size, and for an Inpaint ControlNet its mask
    channel (1, 1, height/8, width/8) before `1 - mask`, by the rule of the ControlNet's family."""
    image = fit_image(control.image, width, height, "a ControlNet image")
    if not controlnet.config.additional_in_channels:
        return image, None
    if isinstance(controlnet, QwenImageInstantXControlNet):
        mask = fit_image(control.inpaint_mask, width, height, "a ControlNet inpaint_mask")
        return instantx_inpaint_image(image, mask, height // 8, width // 8, device)
    return blacked_out(image, control.inpaint_mask), mask_tensor(control.inpaint_mask, height // 8, width // 8, device)


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
