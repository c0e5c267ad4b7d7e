"""`qistudio validate`: render validation prompts with a training result (a LoRA or a full DiT checkpoint).

Whether the file is a LoRA or a full DiT is read from it (the trainer's metadata, else its tensor names); a LoRA is
attached to the base model, a full checkpoint replaces its transformer. One PNG per prompt, carrying its parameters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from ..imageio import save_png
from ..pipeline import QwenImagePipeline, default_device
from ..weights.model_config import DOWNLOAD_SOURCES, ModelConfig
from .generate import DTYPES, HUB_MODEL, model_configs, parse_size, positive_int


def is_lora_file(path: Path) -> bool:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if "qistudio_lora_format" in metadata:
            return True
        return any(".lora_" in key or "lora_down" in key or "lora_A" in key for key in f.keys())


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("validate", help="render prompts with a trained LoRA or DiT checkpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a .safetensors written by `qistudio train` (LoRA or full DiT)")
    p.add_argument("--prompt", action="append", help="validation prompt (repeatable; default: 'a dog')")
    p.add_argument("--model", default=HUB_MODEL, help=f"the base model: hub id or local folder (default {HUB_MODEL})")
    p.add_argument("--steps", type=positive_int, default=40)
    p.add_argument("--size", type=parse_size, default=(1328, 1328), metavar="WxH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--download-source", choices=DOWNLOAD_SOURCES)
    p.add_argument("--model-dir", metavar="DIR")
    p.add_argument("--skip-download", action="store_true", default=None)
    p.add_argument("-o", "--output", default="validation", help="folder for the PNGs (default: ./validation)")
    p.set_defaults(run=run, parser=p)
    return p


def run(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint).expanduser()
    if not checkpoint.is_file():
        args.parser.error(f"{checkpoint}: no such file")
    try:
        lora = is_lora_file(checkpoint)
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        args.parser.error(f"{checkpoint}: not a readable safetensors file ({e})")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    device = args.device or default_device()
    dtype = DTYPES[args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")]
    configs, tokenizer_config, _ = model_configs({"demo": False, "model": args.model}, args)
    if not lora:
        configs[0] = ModelConfig(path=str(checkpoint))  # the trained DiT replaces the base transformer
    pipe = QwenImagePipeline.from_pretrained(torch_dtype=dtype, device=device, model_configs=configs,
                                             tokenizer_config=tokenizer_config)
    if lora:
        pipe.load_lora(pipe.dit, str(checkpoint))
    width, height = args.size
    for index, prompt in enumerate(args.prompt or ["a dog"]):
        image = pipe(prompt, seed=args.seed, num_inference_steps=args.steps, height=height, width=width,
                     cfg_scale=args.cfg, progress_bar_cmd=lambda steps: steps)
        parameters = {"prompt": prompt, "seed": args.seed, "steps": args.steps, "cfg": args.cfg,
                      "size": f"{width}x{height}", "model": args.model, "checkpoint": str(checkpoint.resolve()),
                      "checkpoint_kind": "lora" if lora else "full"}
        path = save_png(image, output / f"validation-{index:02d}.png", parameters)
        print(f"saved {path}", file=sys.stdout)
    return 0
