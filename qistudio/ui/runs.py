"""The UI's side of a job: submit it to the engine, follow its events as updates for the page, cancel it.

Design note. A Gradio event handler that is a generator streams to the browser: `follow` submits the JobSpec,
subscribes to the job's events (the engine calls the subscriber on its own thread, which only puts the event on
a queue) and yields one Update per event: queued, running, each step with its preview, and the end. The job id is
remembered per (browser session, tab), so that tab's Cancel button cancels exactly that job; if the browser goes
away mid-run, Gradio closes the generator and the job is cancelled too.
"""

from __future__ import annotations

import io
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

from PIL import Image

from ..engine import EngineError, JobState, QueueFull

FINISHED = {state.value for state in JobState if state.finished}
WAIT_SECONDS = 0.5  # how often a quiet job is re-checked (a finished job's last event is never missed)


@dataclass
class Update:
    status: str  # one line for people
    preview: Image.Image | None = None
    job: object = None  # the Job, once submitted
    finished: bool = False


class Runs:
    """Jobs submitted from this UI, by owner (browser session, tab)."""

    def __init__(self, holder):
        self.holder = holder
        self._current: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def follow(self, spec, owner: tuple) -> Iterator[Update]:
        """Submit `spec` and yield Updates until the job ends (InputError, QueueFull, EngineError propagate)."""
        engine = self.holder.engine
        try:
            job = engine.submit(spec)
        except QueueFull as error:
            raise EngineError(f"{error} (about {error.retry_after} s)") from None
        with self._lock:
            self._current[owner] = job.id
        events: queue.Queue = queue.Queue()
        past, unsubscribe = job.events_and_subscribe(events.put)
        pending = list(past)
        try:
            while True:
                while not pending:
                    try:
                        pending.append(events.get(timeout=WAIT_SECONDS))
                    except queue.Empty:
                        if job.done:  # defensive: the final event always arrives, but never hang on it
                            pending.append({"type": job.state.value})
                event = pending.pop(0)
                update = _update(job, event)
                if update is not None:
                    yield update
                if event["type"] in FINISHED:
                    return
        finally:
            unsubscribe()
            with self._lock:
                if self._current.get(owner) == job.id:
                    del self._current[owner]
            if not job.done:  # the page went away: nobody will see the result
                engine.cancel(job.id)

    def cancel(self, owner: tuple) -> str:
        """Cancel the owner's running job; a line saying what happened."""
        with self._lock:
            job_id = self._current.get(owner)
        if job_id is None:
            return "nothing to cancel"
        job = self.holder.engine.cancel(job_id)
        if job is None or job.done:
            return "the job had already finished"
        return f"cancelling {job_id} (it stops at its next step)"


def _update(job, event: dict) -> Update | None:
    kind = event["type"]
    if kind == "queued":
        return Update(f"queued ({job.id})", job=job)
    if kind == "running":
        batch = event.get("batch_size", 1)
        return Update(f"running on worker {event.get('worker')}" + (f" with {batch - 1} other job(s)" if batch > 1
                                                                     else ""), job=job)
    if kind == "progress":
        preview = Image.open(io.BytesIO(event["preview"])) if event.get("preview") else None
        return Update(f"step {event['step']}/{event['total']}", preview, job)
    if kind == "retrying":
        return Update(f"retrying: {event.get('reason')}", job=job)
    if kind == "cancelling":
        return Update("cancelling at the next step", job=job)
    if kind == JobState.SUCCEEDED.value:
        result = job.result
        return Update(f"done in {result.seconds:.1f} s on {result.device} (seed {job.spec.arguments['seed']})",
                      job=job, finished=True)
    if kind == JobState.CANCELLED.value:
        return Update("cancelled", job=job, finished=True)
    if kind == JobState.FAILED.value:
        return Update(f"failed: {job.error.message if job.error else 'unknown error'}", job=job, finished=True)
    return None
