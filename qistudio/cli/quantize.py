"""`qistudio quantize`: write a DiT as a GGUF file (Q8_0, Q6_K, Q5_K_M, Q4_K_M, ...; ComfyUI-GGUF's layout) or a
bitsandbytes NF4 safetensors file, from its bf16 (or any float) weights.

Mistakes in the arguments are argparse errors (status 2) before anything is read: the output's suffix for the
type, an existing output without --overwrite, an unwritable folder, a missing source, the gguf package for GGUF
types. The work (weights/quantize_dit.py) reads and writes one tensor at a time; the output appears only when
complete. torch and the models are imported inside `run`, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..fileio import unwritable_folder_reason

PROG = "qistudio quantize"
# weights.quantize_dit.QUANT_TYPES (imported with torch, in run)
TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "BF16", "F16", "NF4")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize", help="write a DiT as a GGUF (Q8_0, Q4_K_M, ...) or NF4 file",
        description="Read a Qwen-Image DiT (a .safetensors file, a folder of shards, any layout qistudio loads) and "
        "write it quantised: GGUF as ComfyUI-GGUF lays Qwen-Image out (block linears in the type, 1-D tensors in "
        "F32, the few top-level weights in the source's precision), or bitsandbytes NF4 safetensors (block "
        "linears in NF4, blocks of 64). Load the result with --model OUT or ModelConfig(path=OUT).",
    )  # fmt: skip
    p.add_argument("source", metavar="SOURCE", help="the DiT: a .safetensors file or a folder of shards")
    p.add_argument("output", metavar="OUT", help="the file to write: .gguf for GGUF types, .safetensors for NF4")
    p.add_argument("--type", required=True, choices=TYPES, dest="qtype",
                   help="_K_M: Q4_K / Q5_K with value and down projections of a quarter of the blocks in Q6_K "
                   "(llama.cpp's rule); _K_S: every block linear in the type")
    p.add_argument("--device", default="cpu", help="where to quantise (cuda is much faster; default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=run, parser=p)
    return p


def check_arguments(args: argparse.Namespace) -> tuple[Path, Path]:
    """The source and output paths, or parser.error (status 2) naming what is wrong. Nothing is written here."""
    error = args.parser.error
    source, target = Path(args.source).expanduser(), Path(args.output).expanduser()
    if not source.exists():
        error(f"SOURCE {args.source}: no such file or folder")
    suffix = ".safetensors" if args.qtype == "NF4" else ".gguf"
    if target.suffix.lower() != suffix:
        error(f"OUT {args.output}: a {args.qtype} file ends in {suffix}")
    if target.exists() and not args.overwrite:
        error(f"OUT {args.output} exists; add --overwrite to replace it")
    reason = unwritable_folder_reason(target.absolute().parent)
    if reason:
        error(f"OUT {args.output}: {reason}")
    if suffix == ".gguf":
        try:
            import gguf  # noqa: F401
        except ImportError:
            error("writing GGUF files needs the gguf package: pip install 'qistudio[gguf]'")
    return source, target


def run(args: argparse.Namespace) -> int:
    source, target = check_arguments(args)
    import torch
    from tqdm import tqdm

    from ..weights.hub import resolve_files
    from ..weights.model_config import ModelConfig
    from ..weights.quantize_dit import quantize_dit

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        args.parser.error(f"--device {args.device}: {e}")
    files = resolve_files(ModelConfig(path=str(source)))
    counts = quantize_dit(files, target, args.qtype, device,
                          progress=lambda names: tqdm(names, desc="quantising", unit="tensor"))
    summary = ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items()))
    print(f"wrote {target} ({target.stat().st_size / 2**30:.2f} GiB; tensors: {summary})", file=sys.stderr)
    return 0
