"""How every benchmark here times code: warm-up excluded, synchronised, rounds interleaved, median and spread.

Design note. Device work is asynchronous, so a run is timed with CUDA events recorded around it (or, with
`wall=True` and off CUDA, the host clock between two synchronisations: pipelines whose host work belongs to the
time). Warm-up runs (compilation, autotuning, handle creation, allocator growth) are never timed. The cases
compared are timed round-robin, one run of each per round: a card at its power limit moves its SM clock by 10-20%
within seconds (bench/RESULTS.md, fourth pass), so timing all of A and then all of B would put that drift into the
ratio. Each case reports the median of its runs and their spread (min-max), never a single run; a difference
smaller than the spread is noise. `card_load()` samples the SM clock and power while the runs go, for the caption.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

MIN_RUNS = 5  # what a number in a table stands on; fewer only for plumbing checks (say so)


@dataclass(frozen=True)
class Timing:
    """Seconds per run of one case (a run: `calls` back-to-back calls, divided by `calls`)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def text(self, unit: str = "s", digits: int = 3) -> str:
        """'0.424 s (0.421-0.428, n=5)': the median, then min-max over the runs."""
        scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
        m, lo, hi = (f"{v * scale:.{digits}f}" for v in (self.median, self.low, self.high))
        return f"{m} {unit} ({lo}-{hi}, n={len(self.samples)})"


def _cuda(device) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def synchronize(device=None) -> None:
    if _cuda(device):
        torch.cuda.synchronize()


def run_seconds(fn: Callable, calls: int = 1, device=None, wall: bool = False) -> float:
    """Seconds per call of `calls` back-to-back calls of fn, synchronised on both sides."""
    cuda = _cuda(device)
    synchronize(device)
    if cuda and not wall:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / calls


def interleaved(cases: Mapping[str, Callable], runs: int = MIN_RUNS, warmup: int = 1, calls: int = 1,
                before: Callable[[str], None] | None = None, device=None, wall: bool = False) -> dict[str, Timing]:
    """{name: Timing} of each case's callable: `warmup` untimed runs of each, then `runs` rounds in which every
    case is timed once, in turn. before(name), if given, runs ahead of each of that case's runs, untimed (a
    backend or launch setting to apply)."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    for name, fn in cases.items():
        for _ in range(warmup):
            if before is not None:
                before(name)
            for _ in range(calls):
                fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, fn in cases.items():
            if before is not None:
                before(name)
            samples[name].append(run_seconds(fn, calls, device, wall))
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def measure(fn: Callable, runs: int = MIN_RUNS, warmup: int = 1, calls: int = 1, device=None,
            wall: bool = False) -> Timing:
    """One case alone (nothing to interleave with): warm-up, then `runs` timed runs."""
    return interleaved({"": fn}, runs, warmup, calls, device=device, wall=wall)[""]


@dataclass
class CardLoad:
    """SM clock, power and temperature sampled while a `card_load()` block ran (empty where nvidia-smi is absent)."""

    samples: list[tuple[float, float, float, float, float]]  # sm MHz, max sm MHz, W, power limit W, C

    def text(self) -> str:
        if not self.samples:
            return "card load not sampled (no nvidia-smi)"
        steady = self.samples[len(self.samples) // 4:] or self.samples  # past the ramp-up
        sm, power, temp = ([s[i] for s in steady] for i in (0, 2, 4))
        return (f"under load: SM clock {min(sm):.0f}-{max(sm):.0f} MHz (max {steady[0][1]:.0f}), power "
                f"{min(power):.0f}-{max(power):.0f} W (limit {steady[0][3]:.0f} W), {min(temp):.0f}-{max(temp):.0f} C")


@contextmanager
def card_load(interval_ms: int = 200):
    """Sample the current GPU with nvidia-smi while the block runs; yields a CardLoad filled on exit."""
    load = CardLoad([])
    if not torch.cuda.is_available():
        yield load
        return
    query = "clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu"
    try:
        sampler = subprocess.Popen(["nvidia-smi", f"--id={torch.cuda.current_device()}", f"--query-gpu={query}",
                                    "--format=csv,noheader,nounits", f"--loop-ms={interval_ms}"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        yield load
        return
    try:
        yield load
    finally:
        sampler.terminate()
        out = sampler.communicate()[0]
        for line in out.splitlines():
            if re.fullmatch(r"[\d., ]+", line.strip()) and line.count(",") == 4:
                load.samples.append(tuple(float(x) for x in line.split(",")))
