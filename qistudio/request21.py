"""What to make with Qwen-Image 2.1: one request, every argument checked before any model runs."""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from PIL import Image

from .conditioning.qwen21 import MULTIPLE, output_size, prepare_condition
from .imageio import read_image
from .request import MAX_IMAGES, MAX_SIZE, _prompts, check_arguments
from .validation import InputError, flag, integer, shown

MAX_EDIT_IMAGES = 10  # Qwen-Image 2.1 edits with one to ten reference images
DEFAULT_RESOLUTION = 1024


@dataclass
class Request21:
    prompts: list[str]
    negative_prompt: str | None = ""
    cfg_scale: float = 1.0  # 2.1 samples without guidance by default
    edit_images: list[Image.Image] = field(default_factory=list)  # RGBA at their condition size, for every prompt
    height: int = DEFAULT_RESOLUTION
    width: int = DEFAULT_RESOLUTION
    output_resolution: int = DEFAULT_RESOLUTION
    num_inference_steps: int = 40
    sigmas: list[float] | None = None
    num_images: int = 1  # per prompt
    seed: int | None = None
    rand_device: str = "cpu"
    noise: torch.Tensor | None = None  # (batch, latent channels, height/16, width/16)
    use_kv_cache: bool = True
    tiled: bool = False
    tile_size: int | tuple = 16
    tile_stride: int | tuple = 12
    callback: Callable | None = None
    progress_bar_cmd: Callable = field(default=lambda it: it)
    extras: dict[str, Any] = field(default_factory=dict)  # per-call records the pipeline keeps (as GenerationRequest)

    @property
    def batch_size(self) -> int:
        return len(self.prompts) * self.num_images

    @property
    def use_cfg(self) -> bool:
        return self.negative_prompt is not None and self.cfg_scale != 1.0

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // 16, self.width // 16


def _edit_images(edit_image) -> list[Image.Image]:
    images = edit_image if isinstance(edit_image, (list, tuple)) else [edit_image]
    if not 1 <= len(images) <= MAX_EDIT_IMAGES:
        raise InputError(f"edit_image takes 1 to {MAX_EDIT_IMAGES} images for Qwen-Image 2.1, got {len(images)}")
    for k, image in enumerate(images):
        if isinstance(image, (list, tuple)):
            raise InputError(f"edit_image[{k}] is a list: Qwen-Image 2.1 takes one flat list of images shared by "
                             "every prompt; call once per prompt for different images")
    return [read_image(image, f"edit_image[{k}]" if len(images) > 1 else "edit_image") for k, image in enumerate(images)]


def _size(name: str, value: int | None) -> int | None:
    if value is not None and value < MULTIPLE:
        raise InputError(f"{name} must be at least {MULTIPLE} (Qwen-Image 2.1 works in multiples of {MULTIPLE}), "
                         f"got {value}")
    return value


def build_request21(prompt, edit_image=None, output_resolution=DEFAULT_RESOLUTION, use_kv_cache=True,
                    **kwargs) -> Request21:
    """Normalise and check the caller's arguments; every error a caller can cause is one InputError, here."""
    request = Request21(prompts=_prompts(prompt), **check_arguments(kwargs))
    request.output_resolution = integer("output_resolution", output_resolution, MULTIPLE, MAX_SIZE)
    request.use_kv_cache = flag("use_kv_cache", use_kv_cache)
    images = [] if edit_image is None else _edit_images(edit_image)
    given = (_size("height", kwargs.get("height")), _size("width", kwargs.get("width")))
    request.height, request.width = output_size(*given, images, request.output_resolution)
    if any(v is not None and v % MULTIPLE for v in given):
        warnings.warn(f"height and width must be multiples of {MULTIPLE}: {given[0]}x{given[1]} is floored to "
                      f"{request.height}x{request.width}", stacklevel=3)
    if max(request.height, request.width) > MAX_SIZE:
        raise InputError(f"the output size {request.width}x{request.height} exceeds {MAX_SIZE} pixels a side")
    if request.batch_size > MAX_IMAGES:
        raise InputError(f"{len(request.prompts)} prompts x num_images={request.num_images} is {request.batch_size} "
                         f"images; at most {MAX_IMAGES} per call")
    size, stride = (v if isinstance(v, tuple) else (v, v) for v in (request.tile_size, request.tile_stride))
    if stride[0] > size[0] or stride[1] > size[1]:
        raise InputError(f"tile_stride {request.tile_stride!r} must not exceed tile_size {request.tile_size!r} "
                         "(latent pixels)")
    request.edit_images = [prepare_condition(image, request.output_resolution) for image in images]
    if request.seed is None:
        request.seed = random.randrange(2**31)
    if request.noise is not None and (request.noise.ndim != 4 or request.noise.shape[0] != request.batch_size
                                      or tuple(request.noise.shape[2:]) != request.latent_size):
        raise InputError(f"noise must have shape ({request.batch_size}, latent channels, {request.latent_size[0]}, "
                         f"{request.latent_size[1]}) (batch, channels, height/16, width/16), got {shown(request.noise)}")
    if request.negative_prompt is None and request.cfg_scale != 1.0:
        warnings.warn(f"negative_prompt=None: no guidance, so cfg_scale={request.cfg_scale:g} has no effect",
                      stacklevel=3)
    return request
