"""The engine every face submits to: one bounded queue of jobs and a pool of worker processes, one per device.

Design note. All state (the waiting jobs, each worker slot and the jobs it runs) lives here under one lock. Work
is handed out whenever it may have become possible: on submit, when a worker reports idle or ready, after a death.
Where the work runs is the pool's business: local processes (pool.py, the default) or Ray Serve replicas
(ray_pool.py); a pool reports each worker's messages (progress, results, failures), a lost worker and a slot
that cannot run at all. A lost worker's unfinished jobs go back to the front of the queue once (`max_attempts`
runs in all, alone on the retry, so one job that kills its worker cannot take a batch of others with it again) and
fail with a clear error after that. Shutdown refuses new jobs, cancels the waiting ones, lets running batches
finish (drain), then stops the pool.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from PIL import Image

from . import pool
from .batching import Capacity, batch_key, select_batch
from .jobs import Job, JobError, JobResult, JobState
from .loras import LoRACatalog
from .models import ModelSpec
from .spec import JobSpec, pipeline_of, to_wire, validate
from .stats import EngineStats

class EngineError(RuntimeError):
    """The engine cannot serve: no worker could load the model, or it is shut down."""


class QueueFull(EngineError):
    """The queue holds `max_queue` waiting jobs; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class EngineConfig:
    model: ModelSpec
    devices: tuple[str, ...] = ("cpu",)  # one worker per entry
    max_queue: int = 64  # waiting jobs; one more is refused (QueueFull)
    max_batch_images: int = 8  # images in one DiT call (1: no batching)
    max_attempts: int = 2  # runs of a job whose worker dies under it
    preview_every: int = 1  # a preview every this many steps (0: none)
    threads_per_worker: int | None = None  # torch threads in each CPU worker
    max_loaded_loras: int = 8  # per worker, unfused beside the DiT
    keep_finished: int = 1000  # finished jobs kept for GET /v1/jobs/{id}
    finished_ttl: float = 3600.0  # seconds a finished job is kept
    lora_dirs: tuple[str, ...] = field(default_factory=tuple)


class Engine:
    def __init__(self, config: EngineConfig, workers=None):
        """`workers`: the pool batches run on (default: pool.ProcessPool, a local process per config.devices)."""
        self.config = config
        self.loras = LoRACatalog(config.lora_dirs)
        self.stats = EngineStats()
        self.lock = threading.RLock()
        self._idle = threading.Condition(self.lock)  # notified when a batch or a worker start ends
        self._waiting: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._finished: deque[Job] = deque()
        options = {"threads": config.threads_per_worker, "preview_every": config.preview_every,
                   "max_loras": config.max_loaded_loras}
        self.pool = workers if workers is not None else pool.ProcessPool(config.model, config.devices, options)
        self.accepting = False
        self._started = False

    @property
    def _slots(self) -> list:
        return self.pool.slots

    # --- life cycle ------------------------------------------------------------------------------------------

    def start(self, timeout: float = 900.0) -> "Engine":
        """Start the pool and wait until each worker has loaded the model; EngineError if any cannot."""
        self.pool.start(self)
        self._started = True
        deadline = time.monotonic() + timeout
        with self.lock:
            while any(s.state == pool.STARTING for s in self._slots) and time.monotonic() < deadline:
                self._idle.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            failed = [s for s in self._slots if s.state != pool.IDLE]
        if failed:
            reason = failed[0].error or f"did not start within {timeout:g} s"
            self.shutdown(timeout=5)
            raise EngineError(f"worker {failed[0].index} on {failed[0].device} could not load "
                              f"{self.config.model.name}: {reason}")
        with self.lock:
            self.accepting = True
            self._schedule()
        return self

    def shutdown(self, timeout: float = 600.0) -> None:
        """Refuse new jobs, cancel waiting ones, let running batches finish (up to `timeout`), stop the workers."""
        with self.lock:
            self.accepting = False
            while self._waiting:
                job = self._waiting.popleft()
                self._finish(job, JobState.CANCELLED, error=JobError("the server shut down before the job started",
                                                                       "shutdown"))
            for slot in self._slots:
                if slot.state == pool.IDLE:
                    self.pool.drain(slot)
            deadline = time.monotonic() + timeout
            while any(s.state == pool.BUSY for s in self._slots) and time.monotonic() < deadline:
                self._idle.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        if self._started:
            self.pool.stop(timeout=10)
        with self.lock:
            for slot in self._slots:  # anything still running was cut off by the timeout
                for job in slot.jobs:
                    if not job.done:
                        self._finish(job, JobState.FAILED, error=JobError(
                            "the server shut down while the job ran", "shutdown"))
                slot.jobs = []

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- what faces call -------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> Job:
        """Check and queue a job. InputError for a bad value; QueueFull when full; EngineError when shut down."""
        request = validate(spec, self.loras, self.config.model)
        job = Job(spec, request)
        job.wire = {"id": job.id, "arguments": to_wire(spec.arguments), "scheduler": spec.scheduler,
                    "loras": [list(pair) for pair in spec.loras],
                    "lora_paths": {name: str(self.loras.path(name)) for name, _ in spec.loras},
                    "pipeline": pipeline_of(request, self.config.model)}
        with self.lock:
            if not self.accepting:
                raise EngineError("the server is shutting down" if self._started else "the engine is not running")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"the queue is full ({self.config.max_queue} jobs waiting); try again later",
                                self._retry_after())
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._schedule()
        return job

    def job(self, job_id: str) -> Job | None:
        with self.lock:
            self._forget_old()
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a job: at once if it waits, at its next step if it runs; None if no such job."""
        with self.lock:
            job = self._jobs.get(job_id)
            if job is None or job.done:
                return job
            job.cancel_requested = True
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, JobState.CANCELLED)
            else:
                self.pool.cancel(self._slots[job.worker], [job.id])
                job.emit("cancelling")
            return job

    def health(self) -> dict:
        with self.lock:
            alive = [s for s in self._slots if s.alive]
            return {"status": "ok" if alive and self.accepting else "unavailable",
                    "model": self.config.model.name, "queue": len(self._waiting),
                    "running": sum(len(s.jobs) for s in self._slots), "max_queue": self.config.max_queue,
                    "workers": [s.summary() for s in self._slots]}

    def snapshot(self) -> dict:
        """Numbers for metrics, read consistently."""
        with self.lock:
            images_per_second, steps_per_second = self.stats.per_second()
            return {"queue": len(self._waiting), "running": sum(len(s.jobs) for s in self._slots),
                    "stats": self.stats, "images_per_second": images_per_second,
                    "steps_per_second": steps_per_second,
                    "workers": [s.summary() for s in self._slots]}

    # --- scheduling (under the lock) -------------------------------------------------------------------------

    def _key(self, job: Job):
        if job.attempts > 0 or self.config.max_batch_images <= 1:
            return None  # a retry runs alone; max_batch_images=1 turns batching off
        return batch_key(job.request, job.spec.scheduler, job.spec.loras)

    def _schedule(self) -> None:
        if not self.accepting:
            return
        for slot in self._slots:
            if not self._waiting:
                return
            if slot.state != pool.IDLE:
                continue
            capacity = slot.capacity or Capacity(self.config.max_batch_images)
            batch = select_batch(list(self._waiting), capacity, self._key, lambda j: j.request)
            for job in batch:
                self._waiting.remove(job)
            slot.jobs, slot.state = batch, pool.BUSY
            for job in batch:
                job.mark_running(slot.index, len(batch))
            self.stats.batch_sizes[len(batch)] += 1
            if not self.pool.dispatch(slot, {"type": "run", "jobs": [job.wire for job in batch]}):
                return  # the pool reports the lost worker, which requeues the batch

    def _retry_after(self) -> int:
        latency = self.stats.latency_seconds
        mean = latency.total / latency.count if latency.count else 10.0
        workers = max(1, sum(s.alive for s in self._slots))
        return int(min(60, max(1, mean * len(self._waiting) / workers / max(1, self.config.max_batch_images))))

    def _finish(self, job: Job, state: JobState, result: JobResult | None = None, error: JobError | None = None):
        job.finish(state, result, error)
        self.stats.record_job(state.value, len(result.images) if result else 0, job.finished - job.created)
        self._finished.append(job)
        self._forget_old()

    def _forget_old(self) -> None:
        horizon = time.time() - self.config.finished_ttl
        while self._finished and (len(self._finished) > self.config.keep_finished
                                  or self._finished[0].finished < horizon):
            self._jobs.pop(self._finished.popleft().id, None)

    # --- what pools report (under the lock) ------------------------------------------------------------------

    def on_message(self, slot: pool.WorkerSlot, message: dict) -> None:
        kind = message["type"]
        jobs = {job.id: job for job in slot.jobs}
        if kind == "ready":
            slot.state, slot.pid, slot.memory, slot.error = pool.IDLE, message["pid"], message["memory"], None
            slot.capacity = Capacity(self.config.max_batch_images, message["free_bytes"],
                                     message["bytes_per_row_pixel"])
            self._idle.notify_all()
            self._schedule()
        elif kind == "progress":
            self.stats.record_step(message["seconds"], message["images"])
            slot.memory = message["memory"]
            for job_id in message["jobs"]:
                if job_id in jobs:
                    jobs[job_id].mark_progress(message["step"], message["total"], message["previews"].get(job_id))
        elif kind == "result" and message["job"] in jobs:
            images = [Image.frombytes(mode, (w, h), data) for mode, w, h, data in message["images"]]
            self._finish(jobs[message["job"]], JobState.SUCCEEDED,
                         JobResult(images, message["device"], message["dtype"], message["seconds"]))
        elif kind == "failed" and message["job"] in jobs:
            error = JobError(message["error"], message["code"], message["user"])
            self._finish(jobs[message["job"]], JobState.FAILED, error=error)
        elif kind == "cancelled" and message["job"] in jobs:
            self._finish(jobs[message["job"]], JobState.CANCELLED)
        elif kind == "capacity" and slot.capacity is not None and slot.capacity.free_bytes is not None:
            slot.capacity.free_bytes = int(slot.capacity.free_bytes * message["shrink"])
        elif kind == "idle":
            slot.jobs, slot.memory = [], message["memory"]
            slot.state = pool.IDLE
            self._idle.notify_all()
            if self.accepting:
                self._schedule()
            else:
                self.pool.drain(slot)

    def on_slot_failed(self, slot: pool.WorkerSlot) -> None:
        """The slot cannot run jobs (its worker could not load, or kept dying); with none left, waiting jobs fail."""
        self._idle.notify_all()
        if self.accepting and not any(s.alive for s in self._slots):
            while self._waiting:
                self._finish(self._waiting.popleft(), JobState.FAILED,
                             error=JobError(f"no worker can run jobs: {slot.error}", "no_workers"))

    def on_worker_lost(self, slot: pool.WorkerSlot, description: str) -> None:
        """The worker under `slot` is gone: its unfinished jobs are retried once (at the queue's front) or fail."""
        self.stats.worker_deaths += 1
        unfinished = [job for job in slot.jobs if not job.done]
        slot.jobs, slot.state = [], pool.DEAD
        for job in reversed(unfinished):  # back to the front, in their order
            if job.cancel_requested:
                self._finish(job, JobState.CANCELLED)
            elif job.attempts < self.config.max_attempts and self.accepting:
                job.mark_requeued(f"{description} while running it; retrying (attempt {job.attempts + 1} of "
                                  f"{self.config.max_attempts})")
                self._waiting.appendleft(job)
            else:
                self._finish(job, JobState.FAILED, error=JobError(
                    f"the worker running this job died ({description}) on each of its {job.attempts} attempt(s)",
                    "worker_died"))
        self._idle.notify_all()
        self._schedule()
