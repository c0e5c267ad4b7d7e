"""Results as files that say what made them: PNGs with `qistudio generate`'s parameters, and reading them back.

Each finished job's images go to OUTPUT/images/ with the CLI's own parameters (cli.generate.png_parameters,
written by imageio.save_png), so `qistudio generate --from-png` remakes a UI image. The images a job was given
(edit images, the image-to-image picture, the painted mask, EliGen's regions, a control map) are written once to
OUTPUT/inputs/JOB/ and the PNG records their paths, as the CLI records the files it was given. Reading a PNG back
gives the Generate tab's fields; what the Generate tab cannot hold (edit images, regions) stays in the shown
parameters.
"""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image

from ..engine.spec import DEFAULT_SCHEDULER
from ..fileio import atomic_path
from ..validation import InputError

# Extra keys the UI records beside the CLI's (STORED): settings the CLI has no flag for, read back by the UI.
LISTED = 200  # results the Gallery shows
EXTRA_KEYS = ("edit_image_auto_resize", "edit_rope_interpolation", "eligen_enable_on_negative", "use_en_prompt")


def _write_png(image: Image.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")
    return str(path.resolve())


def save_inputs(arguments: dict, folder: Path, controlnets: tuple[str, ...] = ()) -> dict:
    """The job's input images written to `folder`; the CLI's record keys -> their paths. `controlnets`: the served
    ControlNets' names, which the jobs' controlnet_ids index."""
    out = {}
    edit = arguments.get("edit_image")
    if edit is not None:
        pictures = edit if isinstance(edit, list) else [edit]
        out["edit_images"] = [_write_png(p, folder / f"edit-{k + 1}.png") for k, p in enumerate(pictures)]
    for key, name in (("input_image", "input"), ("inpaint_mask", "mask"), ("context_image", "context"),
                      ("image", "layered")):
        if arguments.get(key) is not None:
            out["input_image" if key == "image" else key] = _write_png(arguments[key], folder / f"{name}.png")
    controls = arguments.get("blockwise_controlnet_inputs") or []
    if controls:  # as the CLI's --control KIND:PATH:SCALE
        out["controls"] = [f"{controlnets[c['controlnet_id']]}:{_write_png(c['image'], folder / f'control-{k + 1}.png')}:"
                           f"{c.get('scale', 1.0):g}" for k, c in enumerate(controls)]
    if arguments.get("eligen_entity_masks"):
        out["entity_masks"] = [_write_png(m, folder / f"entity-{k + 1}.png")
                               for k, m in enumerate(arguments["eligen_entity_masks"])]
    return out


def stored_settings(job, context, inputs: dict) -> dict:
    """The job as the CLI's settings dict (cli.generate.STORED's keys, plus device), images as saved paths."""
    arguments = job.spec.arguments
    loras = [f"{context.engine.loras.path(name)}:{scale:g}" for name, scale in job.spec.loras]
    return {
        "prompt": arguments.get("prompt", ""), "negative": arguments.get("negative_prompt", ""), "seed": arguments["seed"],
        "steps": arguments["num_inference_steps"], "cfg": arguments.get("cfg_scale", context.default_cfg),
        "model": context.png_model, "demo": context.demo, "strength": arguments.get("denoising_strength", 1.0),
        "tiled": arguments.get("tiled", False), "dtype": job.result.dtype, "device": job.result.device,
        "scheduler": job.spec.scheduler if job.spec.scheduler != DEFAULT_SCHEDULER else None,
        "loras": loras or None, "entities": arguments.get("eligen_entity_prompts"), **inputs,
    }  # fmt: skip


def save_results(job, context) -> list[Path]:
    """Write a succeeded job's images (and its inputs) under the context's output folder; their paths."""
    from ..cli.generate import png_parameters
    from ..imageio import save_png

    inputs = save_inputs(job.spec.arguments, context.inputs_dir / job.id, context.holder.spec.controlnet_names)
    settings = stored_settings(job, context, inputs)
    extras = {key: job.spec.arguments[key] for key in EXTRA_KEYS if key in job.spec.arguments}
    images = job.result.images
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(job.finished or time.time()))
    context.images_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        parameters = {**png_parameters(settings, image), **extras, "job": job.id}
        if job.spec.arguments.get("layers"):  # a layers job's images: each row's layers, bottom first
            layers = job.spec.arguments["layers"]
            parameters.update(layers=layers, layer=index % layers + 1,
                              resolution=job.spec.arguments.get("resolution", 640))
        if len(images) > 1:
            parameters.update(num_images=len(images), image_index=index)
        path = context.images_dir / f"{stamp}-{job.id.removeprefix('job-')[:8]}-{index}.png"
        paths.append(save_png(image, path, parameters))
    return paths


def list_results(folder: Path, limit: int = LISTED) -> list[tuple[str, str]]:
    """(path, caption) of the newest `limit` result PNGs in `folder`, newest first; the caption is its prompt."""
    from ..imageio import read_png_parameters

    found = sorted(folder.glob("*.png"), key=lambda p: (p.stat().st_mtime, p.name), reverse=True)[:limit] \
        if folder.is_dir() else []
    out = []
    for path in found:
        try:
            caption = str(read_png_parameters(path).get("prompt", ""))
        except (OSError, ValueError):
            caption = ""
        out.append((str(path), caption[:80]))
    return out


def read_parameters(path) -> dict:
    """The qistudio parameters of a PNG; InputError naming the file when it has none or cannot be read."""
    from ..imageio import read_png_parameters

    name = Path(str(path)).name
    try:
        parameters = read_png_parameters(path)
    except (OSError, SyntaxError) as error:
        raise InputError(f"{name}: cannot read it as a PNG ({error})") from None
    except ValueError:
        raise InputError(f"{name} carries no qistudio parameters (only PNGs made by qistudio do)") from None
    if not isinstance(parameters, dict):
        raise InputError(f"{name}: its qistudio parameters are not a record")
    return parameters


def generate_fields(parameters: dict, lora_paths: dict[str, str]) -> dict:
    """The Generate tab's values from a PNG's parameters: prompt, negative, seed, steps, cfg, width, height,
    num_images, scheduler, and the LoRAs found in the start-up folders as [name, scale] rows.

    `lora_paths`: catalog name -> file. A recorded LoRA that is not in the catalog is listed in "missing_loras".
    """
    fields = {"prompt": parameters.get("prompt") or "", "negative": parameters.get("negative") or "",
              "seed": parameters.get("seed"), "steps": parameters.get("steps"), "cfg": parameters.get("cfg"),
              "scheduler": parameters.get("scheduler") or DEFAULT_SCHEDULER,
              "num_images": parameters.get("num_images", 1)}
    size = str(parameters.get("size") or "")
    if "x" in size:
        width, height = size.split("x", 1)
        fields["width"], fields["height"] = int(width), int(height)
    by_path = {str(Path(path).resolve()): name for name, path in lora_paths.items()}
    rows, missing = [], []
    for spec in parameters.get("loras") or []:
        path, _, scale = str(spec).rpartition(":")
        name = by_path.get(str(Path(path).resolve()))
        if name is None:
            missing.append(path)
        else:
            rows.append([name, float(scale)])
    fields["loras"], fields["missing_loras"] = rows, missing
    return fields
