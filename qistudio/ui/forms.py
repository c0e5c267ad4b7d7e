"""Form values -> the engine's JobSpec: the same pipe(...) keyword arguments the CLI and the HTTP API send.

One function per feature tab; each starts from the shared settings (`Settings`) and adds its feature's inputs. A
mistake the user can make in a form (no prompt, no image, a region without a prompt) is one InputError naming
it, raised here before anything is queued; every other check is the engine's (`validate`, the pipeline's own
build_request), whose InputError the UI shows the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from ..engine.spec import DEFAULT_SCHEDULER, JobSpec
from ..validation import InputError
from . import masks


@dataclass(frozen=True)
class Settings:
    """The settings every tab shares."""

    negative_prompt: str = ""
    size: tuple[int, int] | None = None  # (width, height); None: the engine's rule (an edit image's size)
    steps: int = 30
    cfg_scale: float = 4.0
    seed: int | None = None  # None: a random seed, chosen by the engine and recorded
    num_images: int = 1
    scheduler: str = DEFAULT_SCHEDULER


def lora_pairs(rows) -> tuple[tuple[str, float], ...]:
    """The LoRA table's rows ([name, scale], ...) as (name, scale) pairs; blank rows are skipped."""
    pairs = []
    for row in rows or []:
        if not row or row[0] is None or not str(row[0]).strip():
            continue
        name, scale = str(row[0]).strip(), row[1] if len(row) > 1 else 1.0
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise InputError(f"LoRA {name!r}: scale must be a number, got {scale!r}") from None
        pairs.append((name, scale))
    return tuple(pairs)


def _prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt: write what to draw")
    return prompt


def _arguments(prompt, settings: Settings) -> dict:
    arguments = {"prompt": _prompt(prompt), "negative_prompt": settings.negative_prompt or "",
                 "cfg_scale": float(settings.cfg_scale), "num_inference_steps": int(settings.steps),
                 "num_images": int(settings.num_images)}
    if settings.size is not None:
        arguments["width"], arguments["height"] = (int(v) for v in settings.size)
    if settings.seed is not None:
        arguments["seed"] = int(settings.seed)
    return arguments


def _spec(arguments: dict, settings: Settings, loras) -> JobSpec:
    return JobSpec(arguments, settings.scheduler or DEFAULT_SCHEDULER, lora_pairs(loras))


def generation(prompt, settings: Settings, loras=()) -> JobSpec:
    """Text-to-image."""
    return _spec(_arguments(prompt, settings), settings, loras)


def edit(prompt, settings: Settings, images, lowres_fix: bool = False, picture_template: bool = False,
         loras=(), area: int | None = None, keep_alpha: bool = False) -> JobSpec:
    """Edit one to three images. Several images (or a model trained on it, Edit-2509/2511) use the "Picture k:"
    template; Lowres-Fix keeps the edit images at their own size and samples their RoPE from the output grid
    (for DiffSynth-Studio's Qwen-Image-Edit-Lowres-Fix LoRA). Without a size the output takes the last image's
    aspect ratio: at `area` pixels when given (a small model's default, as `generate --demo` sizes an edit), else
    at the engine's rule (about 1024x1024). keep_alpha: a model that reads RGBA (Qwen-Image 2.1) gets a picture's
    transparency as it is; the others read RGB."""
    pictures = [_edit_picture(image, keep_alpha) for image in images if image is not None]
    if not pictures:
        raise InputError("edit: give at least one image to edit")
    arguments = _arguments(prompt, settings)
    if settings.size is None and area:
        from .sizes import at_area

        arguments["width"], arguments["height"] = at_area(pictures[-1].size, area)
    arguments["edit_image"] = pictures if len(pictures) > 1 or picture_template else pictures[0]
    if lowres_fix:
        arguments.update(edit_image_auto_resize=False, edit_rope_interpolation=True)
    return _spec(arguments, settings, loras)


def _edit_picture(image, keep_alpha: bool):
    transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    return image.convert("RGBA" if keep_alpha and transparent else "RGB")


def inpaint(prompt, settings: Settings, editor_value, strength: float, loras=()) -> JobSpec:
    """Image-to-image from the editor's picture; where strokes were painted, only that region is repainted."""
    image = masks.background(editor_value)
    if image is None:
        raise InputError("inpaint: upload the image to start from")
    arguments = _arguments(prompt, settings)
    if settings.size is None:
        from .sizes import rounded

        arguments["width"], arguments["height"] = rounded(*image.size)
    arguments["input_image"] = image
    arguments["denoising_strength"] = float(strength)
    mask = masks.mask_image(editor_value)
    if mask is not None:
        arguments["inpaint_mask"] = mask
    return _spec(arguments, settings, loras)


def eligen(prompt, settings: Settings, editor_value, entity_prompts: dict[str, str], on_negative: bool = False,
           loras=()) -> JobSpec:
    """EliGen: each painted colour is one entity's region, described by the prompt given for that colour."""
    regions = masks.regions(editor_value)
    prompts = {name: text.strip() for name, text in entity_prompts.items() if text and text.strip()}
    unnamed = [name for name in regions if name not in prompts]
    if unnamed:
        raise InputError(f"EliGen: the {unnamed[0]} region has no prompt; describe it or erase it")
    unpainted = [name for name in prompts if name not in regions]
    if unpainted:
        raise InputError(f"EliGen: the {unpainted[0]} entity has a prompt but no region; paint it with the "
                         f"{unpainted[0]} brush")
    if not regions:
        raise InputError("EliGen: paint at least one region and give it a prompt")
    arguments = _arguments(prompt, settings)
    if settings.size is None:
        arguments["width"], arguments["height"] = masks.background(editor_value).size
    names = list(regions)
    arguments["eligen_entity_prompts"] = [prompts[name] for name in names]
    arguments["eligen_entity_masks"] = [regions[name] for name in names]
    if on_negative:
        arguments["eligen_enable_on_negative"] = True
    return _spec(arguments, settings, loras)


def in_context(prompt, settings: Settings, control_map: Image.Image | None, loras=()) -> JobSpec:
    """In-Context control: the map (edges, depth, ...) is read as an extra image by the In-Context-Control-Union
    LoRA, which must be in the LoRA stack; the trigger words are added to the prompt by the pipeline."""
    if control_map is None:
        raise InputError("control: upload a control map, or an image and compute its Canny edges")
    arguments = _arguments(prompt, settings)
    arguments["context_image"] = control_map.convert("RGB")
    return _spec(arguments, settings, loras)


def blockwise(prompt, settings: Settings, control_map: Image.Image | None, controlnet: str, scale: float,
              start: float, end: float, loras=(), inpaint_mask: Image.Image | None = None) -> JobSpec:
    """Blockwise ControlNet: the map (e.g. Canny edges) steers the DiT through the named ControlNet, by `scale`,
    while the denoising progress (1 at the first step, 0 at the last) lies between `end` and `start`. The inpaint
    ControlNet reads the picture to repaint as its map and `inpaint_mask` (white = repaint)."""
    if control_map is None:
        raise InputError("control: upload a control map, or an image and compute its Canny edges")
    arguments = _arguments(prompt, settings)
    control = {"image": control_map.convert("RGB"), "controlnet": controlnet, "scale": float(scale),
               "start": float(start), "end": float(end)}
    if inpaint_mask is not None:
        control["inpaint_mask"] = inpaint_mask.convert("RGB")
    arguments["blockwise_controlnet_inputs"] = [control]
    return _spec(arguments, settings, loras)


def layers(prompt, settings: Settings, picture: Image.Image | None, count: int, resolution: int,
           english: bool = False, loras=()) -> JobSpec:
    """Qwen-Image-Layered: the picture split into `count` RGBA layers at `resolution` (its aspect ratio at
    resolution^2 pixels; the settings' size is not used). An empty prompt: the text encoder writes a caption."""
    if picture is None:
        raise InputError("layers: upload the picture to split into layers")
    arguments = {"prompt": prompt or "", "image": picture if picture.mode == "RGBA" else picture.convert("RGBA"),
                 "layers": int(count), "resolution": int(resolution), "negative_prompt": settings.negative_prompt or "",
                 "cfg_scale": float(settings.cfg_scale), "num_inference_steps": int(settings.steps),
                 "num_images": int(settings.num_images)}
    if english:
        arguments["use_en_prompt"] = True
    if settings.seed is not None:
        arguments["seed"] = int(settings.seed)
    return _spec(arguments, settings, loras)
