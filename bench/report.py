"""What every benchmark table carries: a caption naming the card, its clocks and power limit, the library versions,
the exact command and the date; the table itself; and where it is written ($OUT, atomically, and stdout)."""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

# The packages a reader needs to reproduce a row: ours, the peers, and the kernels either side runs.
PACKAGES = ("torch", "triton", "diffusers", "transformers", "torchao", "flash-attn-4", "quack-kernels",
            "nvidia-cutlass-dsl", "nvidia-cudnn-frontend", "sageattention", "diffsynth", "peft")


def command_line() -> str:
    """The command that produced this output, as typed (script path relative to the working directory)."""
    return shlex.join(["python", *sys.argv])


@functools.cache  # asked for by every rewrite of a report
def versions() -> str:
    found, absent = [], []
    for package in PACKAGES:
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            absent.append(package)
    if torch.version.cuda:
        found[0] += f" (CUDA {torch.version.cuda})"
    return ", ".join(found) + (f"; not installed: {', '.join(absent)}" if absent else "")


@functools.cache  # the first reading (before the timed work: the idle clock) stands for the run
def card() -> str:
    """The GPU as nvidia-smi reports it (name, driver, SM clock now and max, power limit now and default)."""
    if not torch.cuda.is_available():
        return f"no GPU (CPU: {os.cpu_count()} cores)"
    name = torch.cuda.get_device_name()
    query = "driver_version,clocks.sm,clocks.max.sm,power.limit,power.default_limit,memory.total"
    try:
        out = subprocess.run(["nvidia-smi", f"--id={torch.cuda.current_device()}", f"--query-gpu={query}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20).stdout
        driver, sm, sm_max, limit, default_limit, memory = (v.strip() for v in out.strip().split(","))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return f"{name} (nvidia-smi unavailable)"
    return (f"{name}, driver {driver}, {int(float(memory)) // 1024} GiB; SM clock {sm} MHz idle (max {sm_max}); "
            f"power limit {limit} W (default {default_limit})")


def caption(what: str, method: str, load: str | None = None) -> str:
    """The paragraph above a table: what was measured and how, on which card and software, by which command."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [what, f"Timing: {method}.", f"Card: {card()}" + (f"; {load}" if load else "") + ".",
             f"Software: Python {sys.version.split()[0]}; {versions()}.", f"Command: `{command_line()}`; {when}."]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(filename: str, text: str, echo: bool = True) -> Path | None:
    """Print `text` (if echo); where $OUT is set, also write it to $OUT/filename (temporary file, then rename)."""
    if echo:
        print(text, flush=True)
    out = os.environ.get("OUT")
    if not out:
        return None
    path = Path(out, filename)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text.rstrip("\n") + "\n")
    tmp.replace(path)
    return path
