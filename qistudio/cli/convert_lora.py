"""`qistudio convert-lora`: rewrite a LoRA file in the layout another tool loads (diffusers, ComfyUI, DiffSynth).

Any layout that `load_lora` reads comes in; `qistudio.lora.convert_lora_file` does the work and writes the file
atomically. Mistakes in the paths are argparse errors (status 2) before anything is read; a file that cannot be
converted (a LoHa layer for diffusers, no Qwen-Image layer at all, a corrupt file) prints one line and gives
status 1, leaving no output file behind (an existing one, with --overwrite, is left as it was).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

from safetensors import safe_open

from ..fileio import unwritable_folder_reason

PROG = "qistudio convert-lora"
FORMATS = ("diffusers", "comfyui", "diffsynth")  # qistudio.lora.FORMATS (imported with torch, in run)
# What follows a layer's name in the files we write (export.py): LoRA pairs, alpha, LoHa, LoKr, dense deltas.
_LAYER_SUFFIX = re.compile(r"\.(lora_[AB](\.default)?\.weight|alpha|hada_\w+|lokr_\w+|diff(_b)?)$")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert-lora", help="rewrite a LoRA file for diffusers, ComfyUI or DiffSynth-Studio",
        description="Read a Qwen-Image LoRA in any layout qistudio loads (PEFT/diffusers, kohya, ComfyUI, "
        "DiffSynth, lightx2v, LoHa/LoKr) and write it in the layout another tool loads.",
    )  # fmt: skip
    p.add_argument("input", metavar="IN", help="the LoRA file to read")
    p.add_argument("output", metavar="OUT", help="the .safetensors file to write")
    p.add_argument("--to", required=True, choices=FORMATS,
                   help="diffusers: transformer.* lora_A/lora_B, alpha folded in; comfyui: diffusion_model.* "
                   "with .alpha kept (also LoHa, LoKr, diff); diffsynth: *.lora_A.default.weight, DiT only")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=run, parser=p)
    return p


def check_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The input and output paths, or parser.error (status 2) naming the bad one. Nothing is written here."""
    error = args.parser.error
    source, target = Path(args.input).expanduser(), Path(args.output).expanduser()
    if not source.exists():
        error(f"IN {args.input}: no such file")
    if source.is_dir():
        error(f"IN {args.input}: is a folder; give the LoRA's .safetensors file")
    try:
        with open(source, "rb") as handle:
            handle.read(1)
    except OSError as e:
        error(f"IN {args.input}: cannot be read ({e.strerror or e})")
    if target.suffix.lower() != ".safetensors":
        error(f"OUT {args.output}: the output must end in .safetensors")
    reason = unwritable_folder_reason(target.absolute().parent)
    if reason:
        error(f"OUT {args.output}: {reason}")
    if target.exists() and os.path.samefile(target, source):  # also through a link
        error(f"OUT {args.output}: is the input file; write the converted LoRA to another file")
    if target.is_dir():
        error(f"OUT {args.output}: is a folder")
    if target.exists() and not args.overwrite:
        error(f"OUT {args.output}: already exists; add --overwrite to replace it")
    return source, target


def count_layers(keys) -> int:
    """Layers (modules) in a file we wrote: its keys less the part after the module name."""
    return len({_LAYER_SUFFIX.sub("", key) for key in keys})


def run(args: argparse.Namespace) -> int:
    source, target = check_paths(args)
    from ..lora import convert_lora_file

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            written = convert_lora_file(source, target, to=args.to)
    except (ValueError, OSError) as e:  # LoRAError and CheckpointError are ValueErrors
        reason = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: cannot convert {args.input} to {args.to}: {reason}", file=sys.stderr)
        return 1
    for warning in caught:
        print(f"{PROG}: note: {warning.message}", file=sys.stderr)
    with safe_open(str(written), framework="pt") as handle:
        keys = list(handle.keys())
    print(f"wrote {written}: {count_layers(keys)} layers, {len(keys)} tensors, {args.to} format")
    return 0
