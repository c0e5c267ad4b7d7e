"""The `qistudio` command: one argparse subcommand per task, each defined in its own module.

A subcommand module offers `add_parser(subparsers)`, which registers its arguments and sets `run` (args -> exit
status) as a default. Mistakes in the arguments go through argparse (`parser.error`: usage, message, status 2)
before any model loads; failures while running print one line `qistudio COMMAND: message` and give status 1,
never a traceback (QISTUDIO_DEBUG=1 shows it). The subcommand modules import torch and the models only inside
`run`, so `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import convert_lora, generate, layers, quantize, serve, train, ui, validate

# What a user can cause, and so is reported as one line: bad values and files (ValueError: the loaders'
# CheckpointError, LoRAError and InputError are ValueErrors), the file system (OSError), a missing optional
# package (ImportError, whose message names the extra to install), and not enough memory.
USER_ERRORS = (ValueError, OSError, ImportError, MemoryError)
# Optional packages (by import name) -> the extra of pyproject.toml that installs them.
EXTRAS = {"peft": "train", "accelerate": "train", "cv2": "annotators", "tensorboard": "tensorboard",
          "cudnn": "hopper", "flash_attn": "hopper", "quack": "hopper", "fastapi": "serve", "uvicorn": "serve",
          "prometheus_client": "serve", "multipart": "serve", "python_multipart": "serve", "ray": "ray"}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="qistudio", description="Generate, edit and train the Qwen-Image family of diffusion models."
    )
    parser.add_argument("--version", action="version", version=f"qistudio {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate.add_parser(subparsers)
    layers.add_parser(subparsers)
    convert_lora.add_parser(subparsers)
    quantize.add_parser(subparsers)
    train.add_parser(subparsers)
    validate.add_parser(subparsers)
    serve.add_parser(subparsers)
    ui.add_parser(subparsers)
    return parser


def is_user_error(error: BaseException) -> bool:
    """An error to report in one line: the kinds above, any error type qistudio defines (DownloadError, the
    training errors), and torch's out-of-memory error."""
    if isinstance(error, USER_ERRORS) or type(error).__module__.startswith("qistudio."):
        return True
    torch = sys.modules.get("torch")  # imported by now if the error can be torch's
    return torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ()))


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message keeps its lines, joined by "; "); a missing optional
    package gets the extra that installs it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = "".join(line if i == 0 else (" " if lines[i - 1].endswith(":") else "; ") + line
                   for i, line in enumerate(lines))
    package = (getattr(error, "name", None) or "").split(".")[0] if isinstance(error, ImportError) else ""
    if package in EXTRAS and "qistudio[" not in text:
        text += f" (pip install 'qistudio[{EXTRAS[package]}]')"
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run `qistudio ARGS`; returns the exit status (argparse's own errors raise SystemExit(2))."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("qistudio: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_user_error(e) or os.environ.get("QISTUDIO_DEBUG"):
            raise
        print(f"{args.parser.prog}: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
