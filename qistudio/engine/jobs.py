"""A job: a validated request, its state, progress and events, and its result once done.

States: queued -> running -> succeeded | failed | cancelled; a running job whose worker died goes back to queued
for its one retry. Every change is an event ({"type": ..., ...}) kept in the job's history (progress events only
the latest) and handed to subscribers, which are called on the engine's thread and must not block (a face hands
the event to its own loop, e.g. asyncio's call_soon_threadsafe).
"""

from __future__ import annotations

import enum
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from .spec import JobSpec

logger = logging.getLogger(__name__)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a message for people, a code for programs, and whether the caller's input caused it."""

    message: str
    code: str
    user: bool = False


@dataclass
class JobResult:
    images: list[Image.Image]
    device: str
    dtype: str
    seconds: float  # on the worker, from the batch's start to its images


@dataclass
class Job:
    spec: JobSpec
    request: Any  # the GenerationRequest validate() built: batching reads it; it never leaves this process
    id: str = field(default_factory=lambda: "job-" + secrets.token_hex(12))
    created: float = field(default_factory=time.time)
    state: JobState = JobState.QUEUED
    step: int = 0
    total_steps: int = 0
    attempts: int = 0
    worker: int | None = None
    started: float | None = None
    finished: float | None = None
    error: JobError | None = None
    result: JobResult | None = None
    cancel_requested: bool = False
    batch_size: int = 0  # jobs in the DiT call that ran it
    preview: bytes | None = None  # the latest small preview (PNG)
    history: list[dict] = field(default_factory=list)
    wire: dict | None = field(default=None, repr=False)  # what the worker is sent (spec.to_wire), built once
    _subscribers: list[Callable[[dict], None]] = field(default_factory=list, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self.total_steps = getattr(self.request, "num_inference_steps", 0)
        self.history.append(self._event("queued"))

    # --- reading ---------------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state.finished

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is finished (True) or `timeout` seconds pass (False)."""
        return self._done.wait(timeout)

    def events_and_subscribe(self, callback: Callable[[dict], None]) -> tuple[list[dict], Callable[[], None]]:
        """The events so far, and `callback(event)` called for every later one (taken under one lock: none is missed
        or seen twice); returns them with the function that unsubscribes."""
        with self._lock:
            past = list(self.history)
            self._subscribers.append(callback)
        return past, lambda: self._unsubscribe(callback)

    def _unsubscribe(self, callback) -> None:
        with self._lock:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

    def summary(self) -> dict:
        """The job as plain data (no images): for GET /v1/jobs/{id} and the events' snapshots."""
        out = {"id": self.id, "status": self.state.value, "created": int(self.created),
               "progress": {"step": self.step, "total": self.total_steps}, "attempts": self.attempts}
        if self.worker is not None:
            out["worker"] = self.worker
        if self.batch_size:
            out["batch_size"] = self.batch_size
        if self.error is not None:
            out["error"] = {"message": self.error.message, "code": self.error.code}
        return out

    # --- changes (called by the engine, under its lock) ------------------------------------------------------

    def _event(self, kind: str, **fields) -> dict:
        return {"type": kind, "job": self.id, "status": self.state.value, "time": time.time(), **fields}

    def emit(self, kind: str, **fields) -> None:
        event = self._event(kind, **fields)
        with self._lock:
            if kind == "progress" and self.history and self.history[-1]["type"] == "progress":
                self.history[-1] = event  # only the latest progress is kept
            else:
                self.history.append(event)
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:  # noqa: BLE001  (a face's broken subscriber must not stop the engine's thread)
                logger.exception("a subscriber of job %s failed", self.id)
        if self.state.finished:
            self._done.set()

    def mark_running(self, worker: int, batch_size: int) -> None:
        self.state, self.worker, self.batch_size = JobState.RUNNING, worker, batch_size
        self.attempts += 1
        self.step = 0
        self.started = self.started or time.time()
        self.emit("running", worker=worker, attempt=self.attempts, batch_size=batch_size)

    def mark_progress(self, step: int, total: int, preview: bytes | None) -> None:
        self.step, self.total_steps = step, total
        if preview is not None:
            self.preview = preview
        self.emit("progress", step=step, total=total, preview=preview)

    def mark_requeued(self, reason: str) -> None:
        self.state, self.worker, self.step = JobState.QUEUED, None, 0
        self.emit("retrying", reason=reason)

    def finish(self, state: JobState, result: JobResult | None = None, error: JobError | None = None) -> None:
        self.state, self.result, self.error = state, result, error
        self.finished = time.time()
        fields = {} if error is None else {"error": {"message": error.message, "code": error.code}}
        self.emit(state.value, **fields)
