"""Speed and memory flags of `qistudio generate`: how the pipeline runs, not what it draws (so a PNG does not
record them; --fp8 changes pixels within FP8 rounding, about 1% of the DiT's output)."""

from __future__ import annotations

import argparse

ATTENTION_BACKENDS = ("sdpa", "flash4", "cudnn_fp8", "sage", "flash3")


def vram_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GiB as a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 GiB (0: the smallest footprint), got {value}")
    return value


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speed and memory")
    group.add_argument("--vram-limit", type=vram_gib, metavar="GiB",
                       help="fit the models into this much GPU memory: they take turns, or stream their blocks from "
                            "host memory (0: the smallest footprint, a few GiB)")
    group.add_argument("--fp8", action="store_true",
                       help="FP8 compute for the DiT: W8A8 linears, and FP8 attention where cuDNN's kernel runs "
                            "(Hopper or newer; about 1.4x faster, ~1%% from bf16)")
    group.add_argument("--compile", action="store_true",
                       help="regional torch.compile of the DiT's blocks: about a minute of warm-up (cached on disk "
                            "for later runs), then faster steps")
    group.add_argument("--attention", choices=ATTENTION_BACKENDS,
                       help="force an attention kernel (default: FlashAttention 4 where installed, else SDPA)")


def check_speed_arguments(args: argparse.Namespace, error) -> None:
    """Refuse what cannot run here before anything loads."""
    if args.attention is not None:
        from ..ops.attention import set_attention_backend

        try:
            set_attention_backend(args.attention)
        except ValueError as e:
            error(f"--attention {args.attention}: {e}")


def apply_before_loras(pipe, args: argparse.Namespace) -> None:
    """FP8 quantises the DiT's linears, which must happen before LoRAs attach to them."""
    if args.fp8:
        pipe.enable_fp8_computation()


def apply_after_loras(pipe, args: argparse.Namespace) -> None:
    if args.vram_limit is not None:
        pipe.enable_vram_management(vram_limit=args.vram_limit)
    if args.compile:
        pipe.compile()
