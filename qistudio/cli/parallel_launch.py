"""`qistudio generate|layers --parallel cfg=2,ulysses=2`: degrees checked, the ranks started, each rank set up.

Two ways in, one code path per rank:
- `qistudio generate ... --parallel DEGREES` (no launcher around it): after the flags are checked, this process
  starts one rank per visible GPU (with --device cpu: as many gloo processes as the degrees make, 2 for auto)
  through torch.distributed's elastic launcher, each running the same command (the module of the subcommand's
  `run`: generate, layers), and waits; rank 0 writes the PNGs.
- `torchrun --nproc_per_node N -m qistudio generate ... [--parallel DEGREES]`: this process is one rank already
  (RANK and WORLD_SIZE set); without --parallel the degrees are "auto".
Every rank takes rank 0's seed, loads the pipeline on its own device and calls enable_parallelism.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from ..parallel.degrees import QWEN_IMAGE_HEADS, ParallelConfigError, parse_degrees, resolve_degrees

QWEN21_HEADS = 32  # Qwen-Image 2.1's DiT (models/dit21.py DiT21Config), not imported here: the CLI loads no torch


def parallel_spec(text: str):
    """--parallel's value: 'cfg=2,ulysses=2' or 'auto'."""
    try:
        return parse_degrees(text)
    except ParallelConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parallel_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--parallel", type=parallel_spec, metavar="cfg=2,ulysses=2|auto",
        help="split the image over several GPUs, one process each (started here, or by torchrun): cfg=1|2 (one "
             "guidance branch per GPU), ulysses=N (attention heads split; N divides 24), ring=N (keys and values "
             "passed around a ring), data=N (images of the batch split); their product is the number of GPUs. "
             "auto: cfg=2, then Ulysses, then ring. With --device cpu: as many gloo processes")


class ParallelRun:
    """What generate.run does differently under --parallel (or torchrun); inactive otherwise."""

    def __init__(self, degrees=None, exit_code: int | None = None):
        self.degrees, self.exit_code = degrees, exit_code  # exit_code: this process only launched the ranks

    @property
    def active(self) -> bool:
        return self.degrees is not None

    def enable(self, pipe) -> None:
        if self.active:
            pipe.enable_parallelism(self.degrees)


def _under_launcher() -> bool:
    """Whether this process is a rank torchrun (or our launcher) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _model_heads(settings: dict) -> int:
    """The DiT's head count, from the demo's config or a folder's transformer/config.json (else the released
    model's: Qwen-Image 2.1's for a 2.1 hub id, Qwen-Image's for any other)."""
    if settings.get("demo"):
        from ..demo import DEMO_DIT

        return DEMO_DIT.num_heads
    config = Path(str(settings.get("model"))).expanduser() / "transformer" / "config.json"
    try:
        return int(json.loads(config.read_text())["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError):
        from .generate21 import is_qwen21_model

        # A hub id before its download: the released model's heads (2.1: 32 of 128, as DiT21Config).
        return QWEN21_HEADS if is_qwen21_model(settings.get("model")) else QWEN_IMAGE_HEADS


def _process_count(spec, device: str, error) -> int:
    if device.startswith("cuda"):
        from ..parallel.launch import visible_gpus

        gpus = visible_gpus()
        wanted = gpus if spec == "auto" else _product(spec)
        if wanted > gpus:
            error(f"--parallel {_text(spec)} needs {wanted} GPUs but {gpus} are visible")
        return wanted
    return 2 if spec == "auto" else _product(spec)


def _product(spec: dict) -> int:
    total = 1
    for value in spec.values():
        total *= value
    return total


def _text(spec) -> str:
    return spec if spec == "auto" else ",".join(f"{k}={v}" for k, v in spec.items())


def start_parallel(args: argparse.Namespace, settings: dict) -> ParallelRun:
    """After the flags are checked, before any model loads: launch the ranks (returning their exit status), or
    set up this rank (device, process group, rank 0's seed), or nothing without parallelism."""
    spec = getattr(args, "parallel", None)
    if spec is None and not _under_launcher():
        return ParallelRun()
    error = args.parser.error
    heads = _model_heads(settings)
    if settings.get("cache"):
        error("--cache does not run with --parallel yet (each rank would decide its own steps)")
    if not _under_launcher():
        count = _process_count(spec, settings["device"], error)
        _check(spec, count, heads, error)
        return ParallelRun(exit_code=_launch(args, count))
    spec = "auto" if spec is None else spec
    _check(spec, int(os.environ["WORLD_SIZE"]), heads, error)
    _join(settings)
    return ParallelRun(degrees=spec)


def _check(spec, world: int, heads: int, error) -> None:
    """One error for degrees that cannot run on `world` ranks with a model of `heads` heads, before anything loads
    (every model, Qwen-Image 2.1 included, runs every layout that passes)."""
    try:
        resolve_degrees(spec, world, heads)
    except ParallelConfigError as e:
        error(f"--parallel: {e}")


def _join(settings: dict) -> None:
    """This rank's device (its own GPU), the process group, and rank 0's seed."""
    import torch

    from ..parallel.mesh import init_distributed, local_device
    from ..parallel.collectives import broadcast_json

    if settings["device"].startswith("cuda"):
        settings["device"] = str(local_device())
    device = torch.device(settings["device"])
    init_distributed(device)
    settings["seed"] = int(broadcast_json(settings["seed"], "seed broadcast", device))


class RankFailed(RuntimeError):
    """A spawned rank's one-line failure, for the launching process to print."""


def _launch(args: argparse.Namespace, count: int) -> int:
    """Run this command on `count` local ranks; rank 0 writes the PNGs. Returns the exit status."""
    from ..parallel import ParallelError
    from ..parallel.launch import launch

    values = {key: value for key, value in vars(args).items() if key not in ("parser", "run")}
    try:
        launch(_rank_main, (values, args.run.__module__), count)
    except ParallelError as e:  # the launcher stopped every rank at the first failure
        print(f"{args.parser.prog}: {str(e).replace(f'{RankFailed.__name__}: ', '')}", file=sys.stderr)
        return 1
    return 0


def _rank_main(values: dict, command: str = "qistudio.cli.generate") -> int:
    """One spawned rank: the command (its module: qistudio.cli.generate or .layers) from its parsed flags. A failure
    raises, so that the launcher stops the other ranks at once (a rank that returned would keep its connections
    open, leaving them waiting)."""
    import importlib

    from .main import is_user_error, one_line

    if command not in ("qistudio.cli.generate", "qistudio.cli.layers"):
        raise ValueError(f"no parallel command {command!r}")
    module = importlib.import_module(command)
    root = argparse.ArgumentParser(prog="qistudio")
    parser = module.add_parser(root.add_subparsers())
    args = argparse.Namespace(**values, parser=parser, run=module.run)
    quiet = int(os.environ.get("RANK", "0")) != 0  # rank 0 speaks for all
    with open(os.devnull, "w") as sink, redirect_stdout(sink if quiet else sys.stdout), \
            redirect_stderr(sink if quiet else sys.stderr):
        try:
            code = module.run(args)
        except SystemExit as e:  # parser.error: the launching process checked the same flags first
            code = e.code
        except Exception as e:  # noqa: BLE001 - one line for the launching process to print
            if not is_user_error(e) or os.environ.get("QISTUDIO_DEBUG"):
                raise
            raise RankFailed(one_line(e)) from None
    if code:
        raise RankFailed(f"exit status {code} (rank 0's message above says why; ranks fail alike)")
    return 0
