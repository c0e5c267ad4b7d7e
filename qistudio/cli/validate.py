"""`qistudio validate`: render validation prompts with a training result (a LoRA, a full DiT or a ControlNet).

What the file is, is read from it (the trainer's metadata, else its tensor names): a LoRA is attached to the base
model, a full DiT replaces its transformer, a Blockwise ControlNet is loaded beside it and fed `--control` (and
`--inpaint-mask`). `--edit-image` validates edit models. One PNG per prompt, carrying its parameters.

Every input (checkpoint, images, output folder, base model) is checked before any model loads; torch and the
models are imported only then. What fails later prints one line (qistudio.cli.main).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..fileio import unwritable_folder_reason
from .generate import (DOWNLOAD_SOURCES, DTYPES, HUB_MODEL, finite_float, model_configs, parse_size, positive_int,
                       resolve_device, seed_int)


def is_lora_file(path: Path) -> bool:
    from ..weights.safetensors_io import read_safetensors_layout  # a bad file: one CheckpointError naming it

    header, metadata = read_safetensors_layout(path)
    if "qistudio_lora_format" in metadata:
        return True
    return any(".lora_" in key or "lora_down" in key or "lora_A" in key for key in header)


def checkpoint_kind(path: Path) -> str:
    """"lora", "controlnet" or "full" (a DiT)."""
    from ..components import detect_kind
    from ..weights.formats import CONTROLNET

    if is_lora_file(path):
        return "lora"
    return "controlnet" if detect_kind([path]) == CONTROLNET else "full"


def controlnet_extra_channels(path: Path) -> int:
    """Input channels of a ControlNet file beyond the 64 of the control latents, from its header: 4 for an Inpaint
    ControlNet (the mask), 0 otherwise."""
    from ..weights.safetensors_io import read_safetensors_header

    header = read_safetensors_header(path)
    for name in ("img_in.weight", "controlnet_x_embedder.weight"):  # Blockwise, InstantX
        if name in header and len(header[name]["shape"]) == 2:
            return header[name]["shape"][1] - 64
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("validate", help="render prompts with a trained LoRA, DiT or ControlNet checkpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a .safetensors written by `qistudio train` (LoRA, full DiT or ControlNet)")
    p.add_argument("--prompt", action="append", help="validation prompt (repeatable; default: 'a dog')")
    p.add_argument("--model", default=HUB_MODEL, help=f"the base model: hub id or local folder (default {HUB_MODEL})")
    p.add_argument("--steps", type=positive_int, default=40)
    p.add_argument("--size", type=parse_size, default=(1328, 1328), metavar="WxH")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--cfg", type=finite_float, default=4.0)
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--download-source", choices=DOWNLOAD_SOURCES)
    p.add_argument("--model-dir", metavar="DIR")
    p.add_argument("--skip-download", action="store_true", default=None)
    p.add_argument("--control", metavar="IMAGE", help="control map for a trained ControlNet (required for one)")
    p.add_argument("--inpaint-mask", metavar="IMAGE", help="inpainting mask for a trained Inpaint ControlNet")
    p.add_argument("--edit-image", metavar="IMAGE", action="append",
                   help="image to edit, for edit models (repeatable)")
    p.add_argument("-o", "--output", default="validation", help="folder for the PNGs (default: ./validation)")
    p.set_defaults(run=run, parser=p)
    return p


def _checked_kind(args: argparse.Namespace, checkpoint: Path) -> str:
    """The checkpoint's kind, with the control inputs it needs given (argparse errors before anything loads)."""
    if not checkpoint.is_file():
        args.parser.error(f"{checkpoint}: no such file")
    try:
        kind = checkpoint_kind(checkpoint)
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        args.parser.error(f"{checkpoint}: not a readable safetensors file ({' '.join(str(e).split())})")
    if kind == "controlnet" and not args.control:
        args.parser.error(f"{checkpoint} is a ControlNet: give its control map with --control IMAGE")
    if kind != "controlnet" and (args.control or args.inpaint_mask):
        args.parser.error(f"--control / --inpaint-mask need a ControlNet checkpoint; {checkpoint} is a {kind} one")
    if kind == "controlnet":
        inpaint = controlnet_extra_channels(checkpoint) > 0
        if inpaint and not args.inpaint_mask:
            args.parser.error(f"{checkpoint} is an Inpaint ControlNet: give its mask with --inpaint-mask IMAGE "
                              "(white = repaint)")
        if args.inpaint_mask and not inpaint:
            args.parser.error(f"--inpaint-mask needs an Inpaint ControlNet; {checkpoint} has no mask channel")
    return kind


def _output_folder(args: argparse.Namespace) -> Path:
    """The -o folder, created if missing, or an argparse error saying why it cannot hold the PNGs."""
    output = Path(args.output).expanduser()
    if output.exists() and not output.is_dir():
        args.parser.error(f"-o {args.output}: is a file; give a folder for the PNGs")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        args.parser.error(f"-o {args.output}: cannot create the folder ({e.strerror or e})")
    reason = unwritable_folder_reason(output)
    if reason:
        args.parser.error(f"-o {args.output}: {reason}")
    return output


def run(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint).expanduser()
    kind = _checked_kind(args, checkpoint)
    images = {}
    for name in ("control", "inpaint_mask"):
        if getattr(args, name):
            images[name] = _image(args, "--" + name.replace("_", "-"), getattr(args, name))
    edit_images = [_image(args, "--edit-image", path) for path in args.edit_image or []]
    output = _output_folder(args)
    device_settings = {} if args.dtype is None else {"dtype": args.dtype}
    resolve_device(device_settings, args.device, args.parser.error)
    device, dtype = device_settings["device"], device_settings["dtype"]
    try:
        configs, tokenizer_config, processor_config = model_configs(
            {"demo": False, "model": args.model, "edit": bool(args.edit_image)}, args)
    except FileNotFoundError as e:
        args.parser.error(str(e))
    import torch

    from ..conditioning.control import ControlNetInput
    from ..imageio import save_png
    from ..pipeline import QwenImagePipeline
    from ..weights.model_config import ModelConfig

    if kind == "full":
        configs[0] = ModelConfig(path=str(checkpoint))  # the trained DiT replaces the base transformer
    elif kind == "controlnet":
        configs.append(ModelConfig(path=str(checkpoint)))
    print(f"loading the model {args.model!r} with the {kind} checkpoint on {device} ({dtype})", file=sys.stderr)
    pipe = QwenImagePipeline.from_pretrained(torch_dtype=getattr(torch, dtype), device=device, model_configs=configs,
                                             tokenizer_config=tokenizer_config, processor_config=processor_config)
    if kind == "lora":
        pipe.load_lora(pipe.dit, str(checkpoint))
    inputs = {}
    if kind == "controlnet":
        inputs["blockwise_controlnet_inputs"] = [ControlNetInput(image=images["control"],
                                                                 inpaint_mask=images.get("inpaint_mask"))]
    if edit_images:
        inputs["edit_image"] = edit_images[0] if len(edit_images) == 1 else edit_images
    width, height = args.size
    for index, prompt in enumerate(args.prompt or ["a dog"]):
        image = pipe(prompt, seed=args.seed, num_inference_steps=args.steps, height=height, width=width,
                     cfg_scale=args.cfg, progress_bar_cmd=lambda steps: steps, **inputs)
        parameters = {"prompt": prompt, "seed": args.seed, "steps": args.steps, "cfg": args.cfg,
                      "size": f"{width}x{height}", "model": args.model, "checkpoint": str(checkpoint.resolve()),
                      "checkpoint_kind": kind}
        for name in ("control", "inpaint_mask", "edit_image"):
            if getattr(args, name):
                parameters[name] = getattr(args, name)
        path = save_png(image, output / f"validation-{index:02d}.png", parameters)
        print(f"saved {path}", file=sys.stdout)
    return 0


def _image(args: argparse.Namespace, flag: str, path: str):
    from ..imageio import load_image

    try:
        return load_image(path)
    except (OSError, ValueError) as e:
        args.parser.error(f"{flag}: {e}")
