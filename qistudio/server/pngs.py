"""Finished jobs as OpenAI image responses: PNGs that record what made them, exactly as `qistudio generate` writes.

The parameters are the CLI's own (`cli.generate.png_parameters`, so `qistudio generate --from-png` reads a served
image back) and the bytes come from the CLI's writer (`imageio.save_png`), which writes a file: each PNG is written
into a private temporary folder and read back, rather than building a second PNG writer here. Images made
together (n > 1) share a seed, so each also records `num_images` and its `image_index`. A layers job's PNGs are
its RGBA layers, each recording `layers` and its `layer` (1 = the bottom), as `qistudio layers` writes them.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

from ..engine import Job
from .settings import ServerSettings


def cli_settings(job: Job, settings: ServerSettings, lora_path) -> dict:
    """The job as the CLI's settings dict (the keys of cli.generate.STORED, plus device)."""
    arguments = job.spec.arguments
    edit = arguments.get("edit_image")
    controls = arguments.get("blockwise_controlnet_inputs") or []
    names = settings.controlnets
    return {
        "prompt": arguments.get("prompt", ""), "negative": arguments.get("negative_prompt", ""),
        "seed": arguments["seed"], "steps": arguments["num_inference_steps"],
        "cfg": arguments.get("cfg_scale", 1.0 if settings.family == "qwen-image-2.1" else 4.0),
        "model": settings.png_model, "demo": settings.demo, "strength": 1.0, "tiled": False,
        "dtype": job.result.dtype, "device": job.result.device,
        "scheduler": job.spec.scheduler if job.spec.scheduler != "Qwen-Image" else None,
        "loras": [f"{lora_path(name)}:{scale:g}" for name, scale in job.spec.loras] or None,
        "entities": arguments.get("eligen_entity_prompts"),
        # Uploaded images have no path to record; the count says that they were given.
        "edit_images": None if edit is None else [f"(upload {k + 1})" for k in range(len(edit) if isinstance(edit, list)
                                                                                     else 1)],
        "inpaint_mask": None if arguments.get("inpaint_mask") is None else "(upload)",
        "input_image": None if arguments.get("image") is None else "(upload)",  # a layers job's picture
        "context_image": None if arguments.get("context_image") is None else "(upload)",
        "controls": [f"{names[c['controlnet_id']]}:(upload {k + 1}):{c.get('scale', 1.0):g}"
                     for k, c in enumerate(controls)] or None,
    }  # fmt: skip



def png_bytes(job: Job, settings: ServerSettings, lora_path) -> list[bytes]:
    """Each image of a finished job as PNG bytes with the CLI's parameters."""
    from ..cli.generate import png_parameters
    from ..imageio import save_png

    stored = cli_settings(job, settings, lora_path)
    images = job.result.images
    out = []
    with tempfile.TemporaryDirectory(prefix="qistudio-serve-") as folder:
        for index, image in enumerate(images):
            parameters = png_parameters(stored, image)
            layers = job.spec.arguments.get("layers")
            if layers:
                parameters.update(layers=layers, layer=index % layers + 1, resolution=job.spec.arguments.get(
                    "resolution", 640))
            if len(images) > 1:
                parameters.update(num_images=len(images), image_index=index)
            path = save_png(image, Path(folder) / f"{index}.png", parameters)
            out.append(path.read_bytes())
    return out


def images_response(job: Job, settings: ServerSettings, lora_path) -> dict:
    """OpenAI's ImagesResponse for a succeeded job (b64_json), with the seed and job id beside it."""
    pngs = png_bytes(job, settings, lora_path)
    first = job.result.images[0]
    return {"created": int(job.finished or job.created),
            "data": [{"b64_json": base64.b64encode(data).decode("ascii"), "revised_prompt": None} for data in pngs],
            "output_format": "png", "size": f"{first.width}x{first.height}",
            "background": "transparent" if first.mode == "RGBA" else "opaque",
            "seed": job.spec.arguments["seed"], "id": job.id}
