"""The `qistudio` command: one argparse subcommand per task, each defined in its own module.

A subcommand module offers `add_parser(subparsers)`, which registers its arguments and sets `run` (args -> exit
status) as a default. Mistakes in the arguments go through argparse (`parser.error`: usage, message, status 2)
before any model loads; failures while loading print one message and give status 1.
"""

from __future__ import annotations

import argparse
import sys

from . import convert_lora, generate, train, validate


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="qistudio", description="Generate, edit and train the Qwen-Image family of diffusion models."
    )
    parser.add_argument("--version", action="version", version=f"qistudio {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate.add_parser(subparsers)
    convert_lora.add_parser(subparsers)
    train.add_parser(subparsers)
    validate.add_parser(subparsers)
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
