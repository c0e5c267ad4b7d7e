"""What to make: one generation request, validated before any model runs."""

from __future__ import annotations

import dataclasses
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from PIL import Image

from .caching import cache_argument
from .conditioning.control import ControlNetInput, fit_image, with_context_trigger
from .conditioning.eligen import EntityControl, entity_control
from .conditioning.layered import LayeredInput, layered_input
from .conditioning.edit import TRAINED_MAX_EDIT_IMAGES, EditRow, output_size_for_edit
from .conditioning.edit_inpaint import edit_inpaint_size
from .imageio import load_image, load_mask, round_size
from .sampling.schedule import custom_sigmas
from .validation import (InputError, device, finite_tensor, flag, function, int_or_pair, integer, number, optional,
                         shown, text, with_bounds)

DEFAULT_SIZE = 1328  # Qwen-Image's native square size, when neither the caller nor an edit image sets one
# Sane maxima, so that a typo (height=100000, num_images=10**6) is an error naming it rather than an allocation
# failure deep inside torch. 8192 px a side is 262,144 image tokens, far past what the models were trained on.
MAX_SIZE = 8192
MAX_STEPS = 10_000
MAX_IMAGES = 1024  # prompts x num_images in one call
MAX_SHIFT_MU = 20.0  # e^20 already pins every shifted sigma at 0 or 1; beyond it math.exp overflows


@dataclass
class GenerationRequest:
    prompts: list[str]
    negative_prompt: str | None = ""  # None: no negative prompt, hence no guidance (diffusers' rule)
    cfg_scale: float = 4.0
    cfg_norm_rescale: bool | None = None  # None: on, but off for Layered (diffusers' defaults); build_request decides
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
    layered: LayeredInput | None = None  # Qwen-Image-Layered: the image to split into layers, and how
    tiled: bool = False
    tile_size: int | tuple = 128
    tile_stride: int | tuple = 64
    cfg_batch: bool = True  # run both guidance branches as one batched DiT call
    cache: Any = None  # step caching (qistudio/caching): a setting, checked from a preset name, text or setting
    callback: Callable | None = None
    progress_bar_cmd: Callable = field(default=lambda it: it)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.prompts) * self.num_images

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale != 1.0 and self.negative_prompt is not None

    @property
    def edit_inpainting(self) -> bool:
        """An Edit model repaints the masked region of its (last) edit image (conditioning/edit_inpaint.py)."""
        return self.inpaint_mask is not None and self.input_image is None and self.edit_rows is not None

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
        raise InputError(
            f"edit_image has {len(edit_image)} entries for {num_prompts} prompt(s); give one image for all "
            "prompts, a list of images for one prompt, or one entry (an image or a list of images) per prompt, "
            "e.g. [[a, b]] * len(prompts) to share a list"
        )
    rows = []
    for k, entry in enumerate(entries):
        multi = _is_image_list(entry)
        images = list(entry) if multi else [entry]
        if not images:
            raise InputError(f"edit_image entry {k} is an empty list; give at least one image")
        if len(images) > TRAINED_MAX_EDIT_IMAGES:
            warnings.warn(
                f"{len(images)} edit images for one prompt; Edit-2509/2511 were trained with 1 to "
                f"{TRAINED_MAX_EDIT_IMAGES}, so results may degrade", stacklevel=4,
            )
        rows.append(EditRow([load_image(im, "edit_image") for im in images], multi))
    return rows


def _control_inputs(inputs) -> list[ControlNetInput]:
    name = "blockwise_controlnet_inputs"
    if inputs is None:
        return []
    if not isinstance(inputs, (list, tuple)):
        raise InputError(f"{name} must be a list of ControlNetInput (wrap a single one in [...]), got {shown(inputs)}")
    checked = []
    for k, control in enumerate(inputs):
        if not isinstance(control, ControlNetInput):
            raise InputError(f"{name}[{k}] must be a ControlNetInput, got {type(control).__name__}")
        image = control.image if control.image is not None else control.inpaint_image
        if image is None:
            raise InputError(f"{name}[{k}] has no image (the control map)")
        scale = number(f"{name}[{k}].scale", control.scale)
        start = number(f"{name}[{k}].start", control.start, 0, 1)
        end = number(f"{name}[{k}].end", control.end, 0, 1)
        if end > start:
            raise InputError(f"{name}[{k}]: need 0 <= end <= start <= 1, got start={start}, end={end}")
        controlnet_id = integer(f"{name}[{k}].controlnet_id", control.controlnet_id, 0)
        mask = None if control.inpaint_mask is None else load_mask(control.inpaint_mask, f"{name}[{k}].inpaint_mask")
        checked.append(dataclasses.replace(control, image=load_image(image, f"{name}[{k}].image"), inpaint_mask=mask,
                                           scale=scale, start=start, end=end, controlnet_id=controlnet_id))
    return checked


# One check per keyword argument of GenerationRequest: the value comes back normalised (plain ints and floats).
ARGUMENT_CHECKS = {
    "negative_prompt": optional(text),
    "cfg_scale": number,
    "cfg_norm_rescale": optional(flag),  # None: diffusers' default (on; off for Layered, its cfg_normalize)
    "num_inference_steps": with_bounds(integer, minimum=1, maximum=MAX_STEPS),
    "height": optional(integer, minimum=1, maximum=MAX_SIZE),
    "width": optional(integer, minimum=1, maximum=MAX_SIZE),
    "num_images": with_bounds(integer, minimum=1, maximum=MAX_IMAGES),
    "seed": optional(integer, minimum=0, maximum=2**64 - 1, bounds=" in [0, 2**64)"),  # torch.Generator's range
    "rand_device": device,
    "noise": optional(finite_tensor),
    "denoising_strength": with_bounds(number, above=0, maximum=1),
    "sigmas": optional(lambda name, value: custom_sigmas(value).tolist()),
    "exponential_shift_mu": optional(number, minimum=-MAX_SHIFT_MU, maximum=MAX_SHIFT_MU),
    "edit_image_auto_resize": flag,
    "edit_rope_interpolation": flag,
    "zero_cond_t": optional(flag),
    "inpaint_blur_size": optional(integer, minimum=0),
    "inpaint_blur_sigma": optional(number, minimum=0),
    "tiled": flag,
    "tile_size": int_or_pair,
    "tile_stride": int_or_pair,
    "cfg_batch": flag,
    "cache": cache_argument,
    "callback": optional(function),
    "progress_bar_cmd": function,
}


def check_arguments(arguments: dict) -> dict:
    """Each keyword argument checked by its rule in ARGUMENT_CHECKS (type, finiteness, range), normalised."""
    return {name: ARGUMENT_CHECKS[name](name, value) if name in ARGUMENT_CHECKS else value
            for name, value in arguments.items()}


def _prompts(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"prompt must be a string or a non-empty list of strings, got {shown(prompt)}")
    return prompts


def _check_sizes(request: GenerationRequest) -> None:
    """What depends on the resolved output size: the size itself, the batch, tiling and the inpainting blur."""
    if max(request.height, request.width) > MAX_SIZE:
        raise InputError(f"the output size {request.width}x{request.height} (from the edit image's aspect ratio) "
                         f"exceeds {MAX_SIZE} pixels a side; pass height= and width=")
    if request.batch_size > MAX_IMAGES:
        raise InputError(f"{len(request.prompts)} prompts x num_images={request.num_images} is "
                         f"{request.batch_size} images; at most {MAX_IMAGES} per call")
    size, stride = (v if isinstance(v, tuple) else (v, v) for v in (request.tile_size, request.tile_stride))
    if stride[0] > size[0] or stride[1] > size[1]:
        raise InputError(f"tile_stride {request.tile_stride!r} must not exceed tile_size {request.tile_size!r} "
                         "(latent pixels)")
    blur = request.inpaint_blur_size
    if request.inpaint_mask is not None and blur and request.inpaint_blur_sigma and blur >= min(request.latent_size):
        raise InputError(f"inpaint_blur_size={blur} must be smaller than the latent grid "
                         f"{request.latent_size[1]}x{request.latent_size[0]} (the output size / 8)")


def _edit_inpaint_size(request: GenerationRequest) -> None:
    """Edit inpainting keeps pixels of the edited image, so the output is that image's working size."""
    size = edit_inpaint_size(request.edit_rows, request.edit_image_auto_resize)
    if request.height is not None and (request.height, request.width) != size:
        raise InputError(f"edit inpainting makes the edit image's working size {size[1]}x{size[0]}; got "
                         f"height={request.height}, width={request.width} (leave them unset)")
    request.height, request.width = size


def _layered(request: GenerationRequest, image, layers, resolution, use_en_prompt, others: dict) -> None:
    """Qwen-Image-Layered's inputs, alone: the output size follows the image at `resolution`."""
    if image is None or layers is None:
        raise InputError(f"layer decomposition needs image= (the picture to split) and layers= (how many layers); "
                         f"{'image' if image is None else 'layers'} is missing")
    others.update(input_image=request.input_image, inpaint_mask=request.inpaint_mask, height=request.height,
                  width=request.width)
    given = [name for name, value in others.items() if value is not None and value != []]
    if given:
        raise InputError(f"layer decomposition (layers=) takes none of {', '.join(given)} (the size follows "
                         "resolution=)")
    request.layered = layered_input(image, layers, resolution, use_en_prompt)
    request.height, request.width = request.layered.size


def _negative_prompt_note(request: GenerationRequest) -> None:
    if request.negative_prompt is None and request.cfg_scale != 1.0:
        warnings.warn(f"negative_prompt=None: no negative prompt, so no classifier-free guidance and cfg_scale="
                      f"{request.cfg_scale:g} has no effect (diffusers' rule); pass negative_prompt='' to guide "
                      "against the empty prompt", stacklevel=4)


def build_request(prompt, edit_image=None, eligen_entity_prompts=None, eligen_entity_masks=None,
                  eligen_enable_on_negative: bool = False, blockwise_controlnet_inputs=None, context_image=None,
                  image=None, layers=None, resolution=640, use_en_prompt=False, **kwargs) -> GenerationRequest:
    """Normalise and check the caller's arguments; every error a caller can cause is raised here (InputError)."""
    prompts = _prompts("" if prompt is None and layers is not None else prompt)  # Layered captions an empty one
    request = GenerationRequest(prompts=prompts, **check_arguments(kwargs))
    if image is not None or layers is not None:
        _layered(request, image, layers, resolution, use_en_prompt, dict(
            edit_image=edit_image, eligen_entity_prompts=eligen_entity_prompts, eligen_entity_masks=eligen_entity_masks,
            blockwise_controlnet_inputs=blockwise_controlnet_inputs, context_image=context_image))
    if request.cfg_norm_rescale is None:
        request.cfg_norm_rescale = request.layered is None
    eligen_enable_on_negative = flag("eligen_enable_on_negative", eligen_enable_on_negative)
    if edit_image is not None:
        request.edit_rows = edit_rows_from(edit_image, len(prompts))
    if request.denoising_strength < 1 and request.input_image is None and not request.edit_inpainting:
        raise InputError(
            f"denoising_strength={request.denoising_strength} needs input_image (image-to-image); "
            "without one, use denoising_strength=1"
        )
    if (request.height is None) != (request.width is None):
        raise InputError(f"give both height and width, or neither; got height={request.height}, "
                         f"width={request.width}")
    if request.edit_inpainting:
        _edit_inpaint_size(request)
    if request.height is None:
        request.height, request.width = (
            output_size_for_edit(request.edit_rows) if request.edit_rows else (DEFAULT_SIZE, DEFAULT_SIZE)
        )
    request.height, request.width = round_size(request.height, request.width)
    if eligen_entity_prompts is not None or eligen_entity_masks is not None:
        if request.edit_rows is not None:
            raise InputError("EliGen entities with edit images are not supported; use one or the other")
        request.entities = entity_control(eligen_entity_prompts, eligen_entity_masks, eligen_enable_on_negative,
                                          *request.latent_size)
    if request.input_image is not None:
        request.input_image = load_image(request.input_image, "input_image")
    if request.inpaint_mask is not None:
        if request.input_image is None and request.edit_rows is None:
            raise InputError("inpaint_mask needs input_image (the image whose unmasked region is kept) or "
                             "edit_image (edit inpainting: the edit image's unmasked region is kept)")
        request.inpaint_mask = load_mask(request.inpaint_mask, "inpaint_mask")
    _check_sizes(request)
    request.controlnet_inputs = _control_inputs(blockwise_controlnet_inputs)
    if context_image is not None:
        request.context_image = fit_image(load_image(context_image, "context_image"), request.width, request.height,
                                          "context_image")
        request.prompts = with_context_trigger(request.prompts)
    if request.seed is None:
        request.seed = random.randrange(2**31)
    if request.noise is not None:
        frames = () if request.layered is None else (request.layered.frames,)
        expected = (request.batch_size, *frames, 16, *request.latent_size)
        if tuple(request.noise.shape) != expected:
            raise InputError(f"noise must have shape {expected} (batch, {'layers + 1, ' if frames else ''}16, "
                             "height/8, width/8), "
                             f"got {tuple(request.noise.shape)}")
    _negative_prompt_note(request)
    return request
