"""What to make: one generation request, validated before any model runs."""

from __future__ import annotations

import dataclasses
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from PIL import Image

from .conditioning.control import ControlNetInput, fit_image, with_context_trigger
from .conditioning.eligen import EntityControl, entity_control
from .conditioning.edit import TRAINED_MAX_EDIT_IMAGES, EditRow, output_size_for_edit
from .imageio import load_image, round_size

DEFAULT_SIZE = 1328  # Qwen-Image's native square size, when neither the caller nor an edit image sets one


@dataclass
class GenerationRequest:
    prompts: list[str]
    negative_prompt: str = ""
    cfg_scale: float = 4.0
    cfg_norm_rescale: bool = True
    num_inference_steps: int = 30
    height: int | None = None  # None: from the edit image (see output_size_for_edit), else DEFAULT_SIZE
    width: int | None = None
    num_images: int = 1  # per prompt
    seed: int | None = None
    rand_device: str = "cpu"
    noise: torch.Tensor | None = None  # (batch, 16, height/8, width/8)
    input_image: Image.Image | None = None
    denoising_strength: float = 1.0
    sigmas: list[float] | None = None
    exponential_shift_mu: float | None = None
    edit_rows: list[EditRow] | None = None  # one per prompt
    edit_image_auto_resize: bool = True
    edit_rope_interpolation: bool = False
    zero_cond_t: bool | None = None  # None: the DiT's own default (its config.json)
    entities: EntityControl | None = None  # EliGen
    controlnet_inputs: list[ControlNetInput] = field(default_factory=list)  # Blockwise ControlNet maps
    inpaint_mask: Image.Image | None = None  # with input_image: white = repaint, the rest is kept
    inpaint_blur_size: int | None = None
    inpaint_blur_sigma: float | None = None
    context_image: Image.Image | None = None  # In-Context control map, at the output size
    tiled: bool = False
    tile_size: int | tuple = 128
    tile_stride: int | tuple = 64
    cfg_batch: bool = True  # run both guidance branches as one batched DiT call
    callback: Callable | None = None
    progress_bar_cmd: Callable = field(default=lambda it: it)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.prompts) * self.num_images

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8


def _is_image_list(value) -> bool:
    return isinstance(value, (list, tuple))


def edit_rows_from(edit_image, num_prompts: int) -> list[EditRow]:
    """One EditRow per prompt from the caller's `edit_image`.

    - an image (PIL or path): every prompt edits it, with the original Edit template;
    - a list of images, one prompt: that prompt reads them all ("Picture 1: ...", Edit-2509/2511);
    - a list with one entry per prompt (several prompts, or a list of lists): entry k belongs to prompt k and is
      an image (original template) or a list of images (multi-image template).
    """
    nested = [_is_image_list(e) for e in edit_image] if _is_image_list(edit_image) else []
    if not _is_image_list(edit_image):
        entries = [edit_image] * num_prompts
    elif num_prompts == 1 and not any(nested):
        entries = [list(edit_image)]
    elif len(edit_image) == num_prompts and (num_prompts > 1 or all(nested)):
        entries = list(edit_image)
    else:
        raise ValueError(
            f"edit_image has {len(edit_image)} entries for {num_prompts} prompt(s); give one image for all "
            "prompts, a list of images for one prompt, or one entry (an image or a list of images) per prompt, "
            "e.g. [[a, b]] * len(prompts) to share a list"
        )
    rows = []
    for k, entry in enumerate(entries):
        multi = _is_image_list(entry)
        images = list(entry) if multi else [entry]
        if not images:
            raise ValueError(f"edit_image entry {k} is an empty list; give at least one image")
        if len(images) > TRAINED_MAX_EDIT_IMAGES:
            warnings.warn(
                f"{len(images)} edit images for one prompt; Edit-2509/2511 were trained with 1 to "
                f"{TRAINED_MAX_EDIT_IMAGES}, so results may degrade", stacklevel=4,
            )
        rows.append(EditRow([load_image(im) for im in images], multi))
    return rows


def _control_inputs(inputs) -> list[ControlNetInput]:
    checked = []
    for k, control in enumerate(inputs or []):
        if not isinstance(control, ControlNetInput):
            raise ValueError(f"blockwise_controlnet_inputs[{k}] must be a ControlNetInput, got {type(control).__name__}")
        image = control.image if control.image is not None else control.inpaint_image
        if image is None:
            raise ValueError(f"blockwise_controlnet_inputs[{k}] has no image (the control map)")
        if not 0 <= control.end <= control.start <= 1:
            raise ValueError(f"blockwise_controlnet_inputs[{k}]: need 0 <= end <= start <= 1, got start={control.start}, "
                             f"end={control.end}")
        mask = None if control.inpaint_mask is None else load_image(control.inpaint_mask)
        checked.append(dataclasses.replace(control, image=load_image(image), inpaint_mask=mask))
    return checked


def build_request(prompt, edit_image=None, eligen_entity_prompts=None, eligen_entity_masks=None,
                  eligen_enable_on_negative: bool = False, blockwise_controlnet_inputs=None, context_image=None,
                  **kwargs) -> GenerationRequest:
    """Normalise and check the caller's arguments; every error a caller can cause is raised here."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    request = GenerationRequest(prompts=prompts, **kwargs)
    if edit_image is not None:
        request.edit_rows = edit_rows_from(edit_image, len(prompts))
    if not isinstance(request.num_inference_steps, int) or request.num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {request.num_inference_steps!r}")
    if request.num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {request.num_images}")
    if not 0 < request.denoising_strength <= 1:
        raise ValueError(f"denoising_strength must be in (0, 1], got {request.denoising_strength}")
    if request.denoising_strength < 1 and request.input_image is None:
        raise ValueError(
            f"denoising_strength={request.denoising_strength} needs input_image (image-to-image); "
            "without one, use denoising_strength=1"
        )
    if (request.height is None) != (request.width is None):
        raise ValueError(f"give both height and width, or neither; got height={request.height}, width={request.width}")
    if request.height is None:
        request.height, request.width = (
            output_size_for_edit(request.edit_rows) if request.edit_rows else (DEFAULT_SIZE, DEFAULT_SIZE)
        )
    request.height, request.width = round_size(request.height, request.width)
    if eligen_entity_prompts is not None or eligen_entity_masks is not None:
        if request.edit_rows is not None:
            raise ValueError("EliGen entities with edit images are not supported; use one or the other")
        request.entities = entity_control(eligen_entity_prompts, eligen_entity_masks, eligen_enable_on_negative,
                                          *request.latent_size)
    if request.input_image is not None:
        request.input_image = load_image(request.input_image)
    if request.inpaint_mask is not None:
        if request.input_image is None:
            raise ValueError("inpaint_mask needs input_image: the image whose unmasked region is kept")
        request.inpaint_mask = load_image(request.inpaint_mask)
    request.controlnet_inputs = _control_inputs(blockwise_controlnet_inputs)
    if context_image is not None:
        request.context_image = fit_image(load_image(context_image), request.width, request.height, "context_image")
        request.prompts = with_context_trigger(request.prompts)
    if request.seed is None:
        request.seed = random.randrange(2**31)
    if request.noise is not None:
        expected = (request.batch_size, 16, *request.latent_size)
        if tuple(request.noise.shape) != expected:
            raise ValueError(f"noise must have shape {expected} (batch, 16, height/8, width/8), "
                             f"got {tuple(request.noise.shape)}")
    return request
