"""`qistudio layers`: split an image into RGBA layers with Qwen-Image-Layered, one PNG per layer plus their composite.

The layers are written bottom first (layer-1.png is the background); composite.png stacks them again, and the
command prints how far that composite is from the input (mean difference in 8-bit levels): the check that the
layers rebuild the picture. Without --prompt the text encoder writes a caption of the image first (Chinese, or
English with --en), as the reference pipeline does. Every input is checked before any model loads; torch and the
models are imported only inside `run`. `--parallel` splits the work over several GPUs (or gloo processes with
--device cpu) as `qistudio generate --parallel` does (parallel_launch.py); rank 0 writes the PNGs.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from .generate import DOWNLOAD_SOURCES, DTYPES, finite_float, lora_spec, positive_int, resolve_device, seed_int
from .parallel_launch import add_parallel_argument, start_parallel
from .speed import add_speed_arguments, apply_after_loras, apply_before_loras, check_speed_arguments

HUB_LAYERED_MODEL = "Qwen/Qwen-Image-Layered"
RESOLUTIONS = (640, 1024)  # qistudio.conditioning.layered.RESOLUTION_AREAS
DEFAULT_STEPS = 50  # the reference pipeline's


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("layers", help="split an image into RGBA layers (Qwen-Image-Layered)",
                              description=__doc__.splitlines()[0])
    p.add_argument("image", help="the picture to split (any image; without alpha it is taken as opaque)")
    p.add_argument("--layers", type=positive_int, default=4, help="how many layers (default: 4)")
    p.add_argument("-o", "--output", default="layers", help="folder for the PNGs (default: ./layers)")
    p.add_argument("--prompt", help="what the image shows (default: a caption the text encoder writes)")
    p.add_argument("--en", action="store_true", help="write that caption in English (default: Chinese)")
    p.add_argument("--resolution", type=int, choices=RESOLUTIONS, default=640,
                   help="working size: the image's aspect ratio at 640x640 or 1024x1024 pixels (default: 640)")
    p.add_argument("--negative", default="", help="negative prompt (default: empty)")
    p.add_argument("--cfg", type=finite_float, default=4.0, help="guidance scale (default: 4; 1 turns it off)")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                   help=f"denoising steps (default: {DEFAULT_STEPS})")
    p.add_argument("--seed", type=seed_int, help="random seed (default: random; printed and stored in the PNGs)")
    p.add_argument("--model", default=HUB_LAYERED_MODEL,
                   help=f"hub id or local folder with transformer/ text_encoder/ vae/ tokenizer/ [processor/] "
                        f"(default: {HUB_LAYERED_MODEL})")
    p.add_argument("--lora", metavar="PATH[:SCALE]", action="append", dest="loras", type=lora_spec,
                   help="apply a LoRA to the DiT (repeatable), at SCALE (default 1)")
    p.add_argument("--device", help="cuda, cuda:1, cpu... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--tiled", action="store_true", help="encode and decode the VAE in tiles (less memory)")
    p.add_argument("--download-source", choices=DOWNLOAD_SOURCES)
    p.add_argument("--model-dir", metavar="DIR", help="where downloads go (default: $QISTUDIO_MODEL_BASE_PATH or ./models)")
    p.add_argument("--skip-download", action="store_true", default=None)
    add_speed_arguments(p)
    add_parallel_argument(p)
    p.set_defaults(run=run, parser=p)
    return p


def _picture(args: argparse.Namespace):
    """The input as RGBA (a conversion said in one line), checked as the pipeline will check it."""
    from ..conditioning.layered import layered_input
    from ..imageio import read_image

    try:
        image = read_image(Path(args.image).expanduser(), "image")
        if image.mode != "RGBA":
            print(f"note: {args.image} is {image.mode}, not RGBA; it is converted to RGBA (opaque where it has no "
                  "alpha)", file=sys.stderr)
            image = image.convert("RGBA")
        layered_input(image, args.layers, args.resolution, args.en)
    except ValueError as e:
        args.parser.error(str(e))
    return image


def _loras(args: argparse.Namespace) -> list[tuple[str, float]]:
    loras = []
    for spec in args.loras or []:
        path, _, scale = spec.rpartition(":")
        if not Path(path).expanduser().exists():
            args.parser.error(f"--lora {spec}: no such file or folder {path}")
        loras.append((str(Path(path).expanduser().resolve()), float(scale)))
    return loras


def run(args: argparse.Namespace) -> int:
    from .generate import model_configs
    from .validate import _output_folder

    image = _picture(args)
    loras = _loras(args)
    check_speed_arguments(args, args.parser.error)
    output = _output_folder(args)
    settings = {} if args.dtype is None else {"dtype": args.dtype}
    resolve_device(settings, args.device, args.parser.error)
    try:  # processor/ too: the caption reads the image through Qwen2.5-VL's processor
        configs, tokenizer_config, processor_config = model_configs(
            {"demo": False, "model": args.model, "edit": True}, args)
    except FileNotFoundError as e:
        args.parser.error(str(e))
    settings.update(model=args.model, seed=random.randrange(2**31) if args.seed is None else args.seed)
    ranks = start_parallel(args, settings)  # --parallel: starts the ranks here and waits; under torchrun: joins
    if ranks.exit_code is not None:
        return ranks.exit_code
    seed = settings["seed"]  # rank 0's under parallelism
    print(f"seed: {seed}")

    import torch
    from tqdm import tqdm

    from ..conditioning.layered import composite, composite_error
    from ..imageio import save_png
    from ..pipeline import QwenImagePipeline

    print(f"loading the model {args.model!r} on {settings['device']} ({settings['dtype']})", file=sys.stderr)
    pipe = QwenImagePipeline.from_pretrained(torch_dtype=getattr(torch, settings["dtype"]), device=settings["device"],
                                             model_configs=configs, tokenizer_config=tokenizer_config,
                                             processor_config=processor_config)
    ranks.enable(pipe)
    apply_before_loras(pipe, args)
    for path, scale in loras:
        pipe.load_lora(pipe.dit, path, alpha=scale)
    apply_after_loras(pipe, args)
    layers = pipe(args.prompt or "", image=image, layers=args.layers, resolution=args.resolution,
                  use_en_prompt=args.en, negative_prompt=args.negative, cfg_scale=args.cfg,
                  num_inference_steps=args.steps, seed=seed, tiled=args.tiled,
                  progress_bar_cmd=lambda steps: tqdm(steps, desc="denoising", unit="step"))
    if layers is None:  # a parallel run's other ranks: rank 0 writes the PNGs
        return 0
    prompt = args.prompt or pipe.last_request.extras.get("caption", "")
    parameters = {"image": str(Path(args.image).expanduser().resolve()), "layers": args.layers, "prompt": prompt,
                  "negative": args.negative, "resolution": args.resolution, "steps": args.steps, "cfg": args.cfg,
                  "seed": seed, "model": args.model, "loras": [f"{p}:{s:g}" for p, s in loras] or None}
    if not args.prompt:
        print(f"caption: {prompt}")
    for index, layer in enumerate(layers, start=1):
        save_png(layer, output / f"layer-{index}.png", {**parameters, "layer": index})
    save_png(composite(layers), output / "composite.png", {**parameters, "layer": "composite"})
    error = composite_error(layers, image)
    print(f"saved {len(layers)} layers and composite.png in {output} ({layers[0].width}x{layers[0].height}); "
          f"the composite differs from the input by {error:.1f} levels on average (of 255)")
    return 0
