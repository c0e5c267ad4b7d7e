"""Running totals of what the engine did, for the faces to report (Prometheus text, /health): no exporter here."""

from __future__ import annotations

import bisect
import collections
import time
from dataclasses import dataclass, field

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds per DiT step
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)  # seconds from submit to finish
WINDOW_SECONDS = 60.0


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bound, not cumulative; one more for +Inf
    total: float = 0.0

    def __post_init__(self):
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class EngineStats:
    jobs: collections.Counter = field(default_factory=collections.Counter)  # final state -> count
    images: int = 0
    steps: int = 0  # DiT steps (one per batch step)
    image_steps: int = 0  # steps x images denoised in them
    worker_deaths: int = 0
    step_seconds: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))
    latency_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)  # jobs per batch -> batches
    _recent: collections.deque = field(default_factory=collections.deque)  # (time, images, steps)

    def record_step(self, seconds: float, images: int) -> None:
        self.steps += 1
        self.image_steps += images
        self.step_seconds.observe(seconds)
        self._note(0, 1)

    def record_job(self, state: str, images: int, latency: float) -> None:
        self.jobs[state] += 1
        self.images += images
        self.latency_seconds.observe(latency)
        self._note(images, 0)

    def _note(self, images: int, steps: int) -> None:
        now = time.monotonic()
        self._recent.append((now, images, steps))
        while self._recent and self._recent[0][0] < now - WINDOW_SECONDS:
            self._recent.popleft()

    def per_second(self) -> tuple[float, float]:
        """(images, DiT steps) per second over the last minute."""
        now = time.monotonic()
        recent = [(i, s) for t, i, s in self._recent if t >= now - WINDOW_SECONDS]
        return sum(i for i, _ in recent) / WINDOW_SECONDS, sum(s for _, s in recent) / WINDOW_SECONDS
