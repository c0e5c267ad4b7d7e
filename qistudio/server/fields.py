"""OpenAI image request fields (and our extra ones) -> a JobSpec for the engine, each bad value one 400 naming it.

OpenAI's fields: prompt, model, n, size ("WxH" or "auto"), response_format (b64_json), output_format (png),
background (auto/opaque), stream (false), partial_images (0); quality, style, user, moderation, safety_identifier,
output_compression and input_fidelity are accepted and have no effect. Edits add image (one or several), mask,
and edit_image_auto_resize (false: the edit images' latents at their own size, not about 1024x1024).
Extra fields (the openai client's `extra_body`): negative_prompt (null: no guidance), seed, num_inference_steps,
cfg_scale (or true_cfg_scale), cfg_norm_rescale, scheduler, exponential_shift_mu, loras ([{"name", "scale"}] or
{name: scale}), entity_prompts with entity_masks (EliGen), controlnets (Blockwise ControlNet: [{"image": map,
"controlnet": a name the server loads (GET /v1/models lists them; default the first), "scale": 1.0, "start": 1.0,
"end": 0.0, "inpaint_mask": mask for the inpaint one}]; the map is used as given, e.g. Canny edges), context_image
(In-Context control: the map read by the In-Context-Control-Union LoRA, named in loras). Edits also take layers
(Qwen-Image-Layered: the image split into that many RGBA layers, returned bottom first, n x layers PNGs; an empty
prompt is replaced by a caption of the image), resolution (640 or 1024) and use_en_prompt. Anything else is
refused, as OpenAI refuses an unknown parameter. Form values arrive as text and are read by the same rules; images
come as uploads or base64 strings.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import warnings

from PIL import Image

from ..engine.spec import DEFAULT_SCHEDULER, JobSpec
from .bodies import is_upload
from .errors import APIError
from .settings import ServerSettings

IGNORED = frozenset({"quality", "style", "user", "moderation", "safety_identifier", "output_compression",
                     "input_fidelity"})
FIELDS = frozenset({"prompt", "model", "n", "size", "response_format", "output_format", "background", "stream",
                    "partial_images", "negative_prompt", "seed", "num_inference_steps", "cfg_scale",
                    "true_cfg_scale", "cfg_norm_rescale", "scheduler", "exponential_shift_mu", "loras",
                    "entity_prompts", "entity_masks", "controlnets", "context_image"}) | IGNORED
EDIT_FIELDS = frozenset({"image", "mask", "edit_image_auto_resize"})
LAYERS_FIELDS = frozenset({"layers", "resolution", "use_en_prompt"})  # an edit that splits the image into layers
CONTROL_NUMBERS = ("scale", "start", "end")
LAYERED = "qwen-image-layered"  # ServerSettings.family of a Qwen-Image-Layered model
DEFAULT_LAYERS = 4  # qistudio layers' default
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def bad(param: str, message: str, status: int = 400, code: str | None = "invalid_value") -> APIError:
    return APIError(status, f"{param}: {message}", param=param, code=code)


# --- single values (JSON values, or text from a form) --------------------------------------------------------

def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"expected an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad(name, f"must be in [{low}, {high}], got {value}" if high is not None else f"must be >= {low}, "
                  f"got {value}")
    return value


def number(name: str, value) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise bad(name, f"expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"expected a finite number, got {value!r}")
    return float(value)


def boolean(name: str, value) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise bad(name, f"expected true or false, got {value!r}")
    return value


def string(name: str, value, limit: int | None = None) -> str:
    if not isinstance(value, str):
        raise bad(name, f"expected a string, got {type(value).__name__}")
    if limit is not None and len(value) > limit:
        raise bad(name, f"is {len(value)} characters long; at most {limit}")
    return value


def choice(name: str, value, allowed: tuple, why: str = "") -> None:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed if a is not None)
        raise bad(name, f"{value!r} is not supported{why}; use {shown}", code="unsupported_value")


def size(name: str, value, settings: ServerSettings, edit: bool) -> tuple[int, int] | None:
    """(width, height), or None where the edit image decides (size "auto" on an edit)."""
    if value is None or value == "auto":
        return None if edit else settings.default_size
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match:
        raise bad(name, f"expected WIDTHxHEIGHT such as 1024x1024 (or 'auto'), got {value!r}")
    width, height = int(match[1]), int(match[2])
    if width < 16 or height < 16 or width % 16 or height % 16:
        raise bad(name, f"width and height must be multiples of 16, at least 16; got {width}x{height}")
    if width * height > settings.limits.max_pixels:
        raise bad(name, f"{width}x{height} is {width * height} pixels; this server makes at most "
                  f"{settings.limits.max_pixels}")
    return width, height


def loras(value, limit: int) -> tuple[tuple[str, float], ...]:
    """[{"name": n, "scale": s}, ...], {name: scale}, or either as a JSON string (a form field from curl)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise bad("loras", "expected a list of {\"name\": ..., \"scale\": ...} or a {name: scale} object") from None
    if isinstance(value, dict):
        value = [{"name": k, "scale": v} for k, v in value.items()]
    if not isinstance(value, list):
        raise bad("loras", f"expected a list of {{\"name\", \"scale\"}} objects, got {type(value).__name__}")
    if len(value) > limit:
        raise bad("loras", f"{len(value)} LoRAs; at most {limit} per request")
    pairs = []
    for k, item in enumerate(value):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item or set(item) - {"name", "scale"}:
            raise bad(f"loras[{k}]", f"expected {{\"name\": ..., \"scale\": ...}}, got {item!r}")
        pairs.append((string(f"loras[{k}].name", item["name"]), number(f"loras[{k}].scale", item.get("scale", 1.0))))
    return tuple(pairs)


# --- images ----------------------------------------------------------------------------------------------------

async def image(name: str, value, settings: ServerSettings) -> Image.Image:
    """An uploaded file or a base64 string (a data: URL too) -> a decoded PIL image, its size checked first."""
    if is_upload(value):
        data, label = await value.read(), repr(value.filename or name)
    elif isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise bad(name, "expected an image file or a base64-encoded image") from None
        label = "(base64)"
    else:
        raise bad(name, f"expected an image file or a base64-encoded image, got {type(value).__name__}")
    limit = settings.limits.max_input_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data))
            if picture.width * picture.height > limit:
                raise bad(name, f"{label} is {picture.width}x{picture.height}; at most {limit} pixels per image",
                          status=400, code="image_too_large")
            picture.load()
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bad(name, f"{label} is too large to decode safely", code="image_too_large") from None
    except Exception as error:  # PIL raises many kinds for a damaged or foreign file
        raise bad(name, f"cannot read {label} as an image ({type(error).__name__}: {error})",
                  code="invalid_image") from None
    return picture


def repaint_mask(mask: Image.Image) -> Image.Image:
    """OpenAI's mask (transparent = edit here) as the pipeline's (white = repaint); without alpha, white = edit."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a < 128 else 0).convert("RGB")
    return mask.convert("RGB")


async def images_of(name: str, value, settings: ServerSettings) -> list[Image.Image]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise bad(name, "give at least one image")
    if len(values) > settings.limits.max_images_in:
        raise bad(name, f"{len(values)} images; at most {settings.limits.max_images_in}")
    return [await image(f"{name}[{k}]" if len(values) > 1 else name, v, settings) for k, v in enumerate(values)]


# --- the whole request -----------------------------------------------------------------------------------------

def _check_openai_fields(body: dict, settings: ServerSettings) -> None:
    if body.get("model") not in (None, settings.model_name):
        raise APIError(404, f"the model {body['model']!r} is not served here; this server serves "
                       f"{settings.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
    choice("response_format", body.get("response_format"), (None, "b64_json"),
           ": this server returns images inline")
    choice("output_format", body.get("output_format"), (None, "png"), ": PNG carries the generation parameters")
    choice("background", body.get("background"), (None, "auto", "opaque"))
    if body.get("stream") not in (None, False, "false"):
        raise bad("stream", "streaming is not supported here; POST /v1/jobs and read GET /v1/jobs/{id}/events "
                  "for progress and previews", code="unsupported_value")
    if body.get("partial_images") not in (None, 0, "0"):
        raise bad("partial_images", "not supported; GET /v1/jobs/{id}/events streams previews",
                  code="unsupported_value")


async def job_spec(body: dict, settings: ServerSettings, edit: bool) -> JobSpec:
    """The JobSpec for a generation (edit=False) or an edit (edit=True: `image` required, `mask` optional)."""
    allowed = FIELDS | EDIT_FIELDS | LAYERS_FIELDS if edit else FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        where = "" if edit else (" (edit images and layers go to POST /v1/images/edits)"
                                 if set(unknown) & (EDIT_FIELDS | LAYERS_FIELDS) else "")
        raise APIError(400, f"unknown parameter {unknown[0]!r}{where}", param=unknown[0], code="unknown_parameter")
    layers = edit and ("layers" in body or settings.family == LAYERED)
    if "prompt" not in body and not layers:
        raise APIError(400, "prompt is required", param="prompt", code="missing_required_parameter")
    _check_openai_fields(body, settings)
    limits = settings.limits
    prompt = string("prompt", body.get("prompt", ""), limits.max_prompt_chars)
    if not prompt.strip() and not layers:  # Layered captions the image instead
        raise bad("prompt", "must not be empty")
    arguments = {"prompt": prompt, "num_images": integer("n", body.get("n", 1), 1, limits.max_n),
                 "num_inference_steps": integer("num_inference_steps",
                                                body.get("num_inference_steps", settings.default_steps), 1,
                                                limits.max_steps)}
    dims = None if layers else size("size", body.get("size"), settings, edit)
    if layers and body.get("size") not in (None, "auto"):
        raise bad("size", "a layers edit makes the image's aspect ratio at resolution^2 pixels; give resolution "
                  "(640 or 1024), not size")
    if dims is not None:
        arguments["width"], arguments["height"] = dims
    if "negative_prompt" in body:
        arguments["negative_prompt"] = None if body["negative_prompt"] is None else string(
            "negative_prompt", body["negative_prompt"], limits.max_prompt_chars)
    if "seed" in body:
        arguments["seed"] = integer("seed", body["seed"], 0, 2**64 - 1)
    if "cfg_scale" in body and "true_cfg_scale" in body:
        raise bad("true_cfg_scale", "give cfg_scale or true_cfg_scale (the same thing), not both")
    for name in ("cfg_scale", "true_cfg_scale"):
        if name in body:
            arguments["cfg_scale"] = number(name, body[name])
    if "cfg_norm_rescale" in body:
        arguments["cfg_norm_rescale"] = boolean("cfg_norm_rescale", body["cfg_norm_rescale"])
    if "exponential_shift_mu" in body:
        arguments["exponential_shift_mu"] = number("exponential_shift_mu", body["exponential_shift_mu"])
    await _entities(body, arguments, settings)
    await _controls(body, arguments, settings)
    if layers:
        await _layers(body, arguments, settings)
    elif edit:
        await _edit_images(body, arguments, settings)
    scheduler = string("scheduler", body.get("scheduler", DEFAULT_SCHEDULER))
    chosen = loras(body["loras"], limits.max_loras) if "loras" in body else ()
    return JobSpec(arguments, scheduler, chosen)


async def _entities(body: dict, arguments: dict, settings: ServerSettings) -> None:
    prompts, masks = body.get("entity_prompts"), body.get("entity_masks")
    if prompts is None and masks is None:
        return
    prompts = prompts if isinstance(prompts, list) else [prompts] if prompts is not None else []
    arguments["eligen_entity_prompts"] = [string(f"entity_prompts[{k}]", p) for k, p in enumerate(prompts)]
    arguments["eligen_entity_masks"] = await images_of("entity_masks", masks if masks is not None else [], settings)


async def _edit_images(body: dict, arguments: dict, settings: ServerSettings) -> None:
    if "image" not in body:
        raise APIError(400, "image is required for an edit", param="image", code="missing_required_parameter")
    pictures = await images_of("image", body["image"], settings)
    several = len(pictures) > 1 or settings.picture_template
    arguments["edit_image"] = pictures if several else pictures[0]
    if "edit_image_auto_resize" in body:
        arguments["edit_image_auto_resize"] = boolean("edit_image_auto_resize", body["edit_image_auto_resize"])
    if body.get("mask") is not None:
        mask = (await images_of("mask", body["mask"], settings))[0]
        if mask.size != pictures[0].size:
            raise bad("mask", f"is {mask.width}x{mask.height} but the (first) image is "
                      f"{pictures[0].width}x{pictures[0].height}; they must match")
        arguments["input_image"], arguments["inpaint_mask"] = pictures[0], repaint_mask(mask)


async def _controls(body: dict, arguments: dict, settings: ServerSettings) -> None:
    """controlnets -> blockwise_controlnet_inputs (images decoded, numbers read; the engine checks the rest),
    context_image -> context_image."""
    if body.get("context_image") is not None:
        arguments["context_image"] = await image("context_image", body["context_image"], settings)
    value = body.get("controlnets")
    if value is None:
        return
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise bad("controlnets", 'expected a list of {"image", "controlnet", "scale", "start", "end"} '
                      "objects") from None
    value = value if isinstance(value, list) else [value]
    if len(value) > settings.limits.max_images_in:
        raise bad("controlnets", f"{len(value)} control maps; at most {settings.limits.max_images_in}")
    inputs = []
    for k, item in enumerate(value):
        name = f"controlnets[{k}]"
        if not isinstance(item, dict) or "image" not in item:
            raise bad(name, f'expected {{"image": ..., "controlnet": ..., "scale": ...}}, got {item!r:.80}')
        item = dict(item)
        for key in ("image", "inpaint_mask"):
            if item.get(key) is not None:
                item[key] = await image(f"{name}.{key}", item[key], settings)
        for key in CONTROL_NUMBERS:
            if key in item:
                item[key] = number(f"{name}.{key}", item[key])
        chosen = item.get("controlnet")
        if isinstance(chosen, str) and re.fullmatch(r"\s*\d+\s*", chosen):
            item["controlnet"] = int(chosen)  # a form's index
        inputs.append(item)
    arguments["blockwise_controlnet_inputs"] = inputs


async def _layers(body: dict, arguments: dict, settings: ServerSettings) -> None:
    """An edit that splits its one image into `layers` RGBA layers (Qwen-Image-Layered)."""
    if "image" not in body:
        raise APIError(400, "image is required for an edit", param="image", code="missing_required_parameter")
    if body.get("mask") is not None:
        raise bad("mask", "a layers edit takes no mask")
    pictures = await images_of("image", body["image"], settings)
    if len(pictures) > 1:
        raise bad("image", f"a layers edit splits one image, got {len(pictures)}")
    arguments["image"] = pictures[0]
    arguments["layers"] = integer("layers", body.get("layers", DEFAULT_LAYERS), 1, settings.limits.max_layers)
    if "resolution" in body:
        arguments["resolution"] = integer("resolution", body["resolution"])
    if "use_en_prompt" in body:
        arguments["use_en_prompt"] = boolean("use_en_prompt", body["use_en_prompt"])
