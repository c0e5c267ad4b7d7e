"""What a job asks for: pipe(...)'s keyword arguments plus scheduler and LoRAs, checked once, sent as plain data.

Design note. Every face (CLI, HTTP, UI) describes a job the same way: the keyword arguments it would give
`QwenImagePipeline.__call__`, the scheduler's template name and the LoRAs by name. `validate` turns that into the
one request type, GenerationRequest, through `build_request` (so a bad value is one InputError naming it, before
the job is queued), then writes the resolved seed and size back into the arguments: the worker that runs the job
calls pipe(...) with exactly these arguments and so draws exactly the noise the seed names.

Between processes the arguments travel as plain values only (str, int, float, bool, None, lists, dicts and images
as raw pixels with their mode and size): never tensors, callables or arbitrary objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..validation import InputError, shown

# The pipe(...) arguments a job may carry: everything that says what to draw, nothing that is code (callback,
# progress_bar_cmd), a tensor (noise) or an output switch (output_type).
ARGUMENTS = frozenset({
    "prompt", "negative_prompt", "cfg_scale", "input_image", "denoising_strength", "height", "width", "seed",
    "num_inference_steps", "exponential_shift_mu", "edit_image", "edit_image_auto_resize", "edit_rope_interpolation",
    "zero_cond_t", "eligen_entity_prompts", "eligen_entity_masks", "eligen_enable_on_negative", "inpaint_mask",
    "inpaint_blur_size", "inpaint_blur_sigma", "context_image", "tiled", "tile_size", "tile_stride", "num_images",
    "cfg_norm_rescale", "sigmas", "cfg_batch", "blockwise_controlnet_inputs", "image", "layers", "resolution",
    "use_en_prompt",
})  # fmt: skip
# Qwen-Image 2.1's pipe(...) (pipeline21.py) takes fewer: no image-to-image, EliGen, ControlNet or Layered inputs.
ARGUMENTS21 = frozenset({
    "prompt", "negative_prompt", "cfg_scale", "edit_image", "height", "width", "output_resolution", "seed",
    "num_inference_steps", "sigmas", "use_kv_cache", "num_images", "tiled", "tile_size", "tile_stride",
})  # fmt: skip
DEFAULT_SCHEDULER = "Qwen-Image"
MAIN, LAYERED_PIPELINE = "main", "layered"  # the worker's pipelines a job may run on


@dataclass
class JobSpec:
    """One job: pipe(...)'s arguments, the scheduler template, LoRAs as (name, scale) from the start-up folders."""

    arguments: dict[str, Any]
    scheduler: str = DEFAULT_SCHEDULER
    loras: tuple[tuple[str, float], ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)  # the face's own record (PNG parameters); not read here


def validate(spec: JobSpec, known_loras, model=None) -> Any:
    """The request of `spec` (InputError on any bad value); resolves seed and size in spec.arguments.

    known_loras: the names a job may use (a container); a name outside it is an InputError listing them.
    model: the served ModelSpec (None: a Qwen-Image model without ControlNets): its family says which pipe(...)
    the arguments are checked against, its ControlNets which a job may name. The request is a GenerationRequest,
    or for Qwen-Image 2.1 a Request21.
    """
    from ..sampling.schedule import FlowMatchScheduler
    from .models import QWEN21, family_name

    family = None if model is None else model.family
    allowed = ARGUMENTS21 if family == QWEN21 else ARGUMENTS
    unknown = sorted(set(spec.arguments) - allowed)
    if unknown:
        what = f"{family_name(family)} job" if family == QWEN21 else "job"
        raise InputError(f"unknown argument {unknown[0]!r}; a {what} takes {', '.join(sorted(allowed))}")
    if spec.scheduler not in FlowMatchScheduler.TEMPLATES:
        raise InputError(f"scheduler must be one of {', '.join(sorted(FlowMatchScheduler.TEMPLATES))}, "
                         f"got {shown(spec.scheduler)}")
    names = [name for name, _ in spec.loras]
    for name in names:
        if name not in known_loras:
            available = ", ".join(sorted(known_loras)[:20]) or "none (start the server with --lora-dir DIR)"
            raise InputError(f"unknown LoRA {shown(name)}; available: {available}")
    if len(set(names)) != len(names):
        raise InputError(f"a LoRA is named twice in {names}; give each once with its scale")
    request = _request(spec, model)
    spec.arguments["seed"] = request.seed
    if getattr(request, "layered", None) is None:  # a layers job's size follows its image (resolution=)
        spec.arguments.update(height=request.height, width=request.width)
    return request


def _request(spec: JobSpec, model):
    from ..request import build_request
    from ..request21 import build_request21
    from .control import NAME, resolve
    from .models import QWEN21

    if model is not None and model.family == QWEN21:
        return build_request21(**spec.arguments)
    if NAME in spec.arguments:
        spec.arguments[NAME] = resolve(spec.arguments[NAME], () if model is None else model.controlnet_names)
    arguments = dict(spec.arguments)
    if arguments.get(NAME):
        from .control import control_inputs

        arguments[NAME] = control_inputs(arguments[NAME])
    request = build_request(**arguments)
    pipeline_of(request, model)  # a job the served models cannot run is refused here, before it is queued
    return request


def pipeline_of(request, model) -> str:
    """Which of the worker's pipelines runs a request: the served model's, or the Layered one served beside it."""
    from .models import LAYERED, family_name

    family = None if model is None else model.family
    layers = getattr(request, "layered", None) is not None
    if family == LAYERED and not layers:
        raise InputError(f"this server's model is {family_name(LAYERED)}: it splits an image into layers; give "
                         "image= and layers= (POST /v1/images/layers)")
    if not layers or family == LAYERED or model is None:
        return MAIN
    if model.layered is None:
        raise InputError(f"layers: this server has no {family_name(LAYERED)} model; start it with "
                         "--layered-model Qwen/Qwen-Image-Layered (or --demo)")
    return LAYERED_PIPELINE


# --- plain values across the process boundary ----------------------------------------------------------------

_IMAGE = "__image__"


def to_wire(value):
    """`value` with PIL images as {"__image__": [mode, width, height, pixels]}; anything not plain is refused."""
    if isinstance(value, Image.Image):
        return {_IMAGE: [value.mode, value.width, value.height, value.tobytes()]}
    if isinstance(value, dict):
        return {str(k): to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    raise TypeError(f"a job argument must be plain data or a PIL image, got {type(value).__name__}")


def from_wire(value):
    if isinstance(value, dict):
        if set(value) == {_IMAGE}:
            mode, width, height, pixels = value[_IMAGE]
            return Image.frombytes(mode, (width, height), pixels)
        return {k: from_wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_wire(v) for v in value]
    return value
