"""Qwen-Image-Layered's inputs: the RGBA image to decompose, how many layers, and how they meet the DiT.

Design note. Layered denoises layers + 1 RGBA images at once (frame 0 the composite, then the layers) as one
sequence: each frame is patchified on its own and the frames follow each other, then the input image's tokens.
The layer-3D RoPE gives frame f of the output the frame position f and the input image the position -1
(ops/rope.py layer_rotary); every token carries the DiT's extra timestep row (models/dit.py). The working size
follows diffusers' QwenImageLayeredPipeline: the input's aspect ratio at `resolution`^2 pixels (640 or 1024, the
two buckets the model was trained at), sides multiples of 32, the image resized with Lanczos. The layers come
out bottom first: compositing them in order over transparent black rebuilds the image (the paper's
C_i = alpha_i RGB_i + (1 - alpha_i) C_(i-1)), which `composite` does, so a result can be checked against its input.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..imageio import read_image
from ..ops.rope import ImageGrid, Rotary, layer_rotary
from ..validation import InputError, flag, integer
from .edit import size_at_area

# The trained buckets and their working areas (a module constant, so that tests can shrink them).
RESOLUTION_AREAS = {640: 640 * 640, 1024: 1024 * 1024}
MAX_LAYERS = 64  # a typo guard; the model was trained with a handful


@dataclass
class LayeredInput:
    image: Image.Image  # RGBA at the working size
    layers: int
    use_en_prompt: bool

    @property
    def frames(self) -> int:
        """Generated frames: the composite, then the layers."""
        return self.layers + 1

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the working size."""
        return self.image.height, self.image.width


def layered_input(image, layers, resolution, use_en_prompt) -> LayeredInput:
    """Check and prepare Layered's inputs; a non-RGBA image is converted (opaque), with a warning."""
    layers = integer("layers", layers, 1, MAX_LAYERS)
    resolution = integer("resolution", resolution)
    if resolution not in RESOLUTION_AREAS:
        raise InputError(f"resolution must be one of {', '.join(map(str, RESOLUTION_AREAS))} (the model's trained "
                         f"buckets), got {resolution}")
    use_en_prompt = flag("use_en_prompt", use_en_prompt)
    picture = read_image(image, "image")
    if picture.mode != "RGBA":
        warnings.warn(f"image is {picture.mode}, not RGBA; it is converted to RGBA (opaque where it has no alpha)",
                      stacklevel=4)
        picture = picture.convert("RGBA")
    width, height = size_at_area(RESOLUTION_AREAS[resolution], picture.width / picture.height)
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.LANCZOS)
    return LayeredInput(picture, layers, use_en_prompt)


def rgba_tensor(image: Image.Image, device=None, dtype=torch.float32) -> torch.Tensor:
    """PIL RGBA -> (1, 4, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image.convert("RGBA"), dtype=np.float32))
    return (array.permute(2, 0, 1)[None] / 127.5 - 1).to(device=device, dtype=dtype)


def pack_frames(latents: torch.Tensor) -> torch.Tensor:
    """(B, F, C, h, w) -> (B, F * h/2 * w/2, 4 C): each frame patchified 2x2, frames one after another."""
    batch, frames, channels, height, width = latents.shape
    x = latents.reshape(batch, frames, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(batch, frames * (height // 2) * (width // 2), channels * 4)


def unpack_frames(tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """The inverse of pack_frames, for a latent grid of height x width."""
    batch, _, features = tokens.shape
    x = tokens.reshape(batch, frames, height // 2, width // 2, features // 4, 2, 2).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(batch, frames, features // 4, height, width)


def layered_rotary(frames: int, latent_size: tuple[int, int], text_length: int, axes_dim, device) -> Rotary:
    """RoPE of [frames 0..F-1 | the input image at frame -1 | text], all on the same patch grid."""
    height, width = latent_size[0] // 2, latent_size[1] // 2
    grids = [ImageGrid(frame, height, width) for frame in range(frames)]
    return layer_rotary(grids, ImageGrid(-1, height, width), text_length, device, axes_dim)


def composite(layers: list[Image.Image], background=(0, 0, 0, 0)) -> Image.Image:
    """The layers alpha-composited in order (the first at the bottom) over `background` (transparent black)."""
    canvas = Image.new("RGBA", layers[0].size, background)
    for layer in layers:
        canvas = Image.alpha_composite(canvas, layer.convert("RGBA"))
    return canvas


def composite_error(layers: list[Image.Image], image: Image.Image) -> float:
    """Mean absolute difference, in 8-bit levels over RGB, between the layers composited over opaque black and
    `image` (resized to the layers' size, flattened on black too): how faithfully the layers rebuild the input."""
    black = (0, 0, 0, 255)
    rebuilt = np.asarray(composite(layers, black).convert("RGB"), dtype=np.float32)
    source = composite([image.convert("RGBA").resize(layers[0].size, Image.LANCZOS)], black)
    return float(np.abs(rebuilt - np.asarray(source.convert("RGB"), dtype=np.float32)).mean())
