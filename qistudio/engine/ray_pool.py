"""Batches run on Ray Serve replicas: the engine's pool over a deployment handle, one stream per batch.

Design note. The engine keeps its queue, batching and job states in the ingress replica; this pool offers it
`concurrency` slots (the deployment's most replicas), and a batch dispatched to a slot becomes one streaming call
of the worker deployment (ray_worker.py), read on a thread of its own. The deployment takes one batch per replica
(max_ongoing_requests=1), so while fewer replicas run than slots are busy, Ray Serve's router holds the rest:
that queue is what its autoscaler scales the replicas on. A replica that dies under a batch ends the stream with
an error: its jobs are retried once like a local worker's (Ray Serve starts a new replica by itself). A cancel
reaches a replica only by cancelling the stream, so it stops the whole batch once all its jobs are cancelled;
a cancelled job inside a larger batch has its images dropped here instead.
"""

from __future__ import annotations

import threading

from .batching import Capacity
from .pool import IDLE, WorkerSlot


class RayPool:
    def __init__(self, handle, concurrency: int, max_batch_images: int):
        self.handle = handle
        self.max_batch_images = max_batch_images
        self.slots = [WorkerSlot(i, "ray", state=IDLE) for i in range(concurrency)]
        self.engine = None
        self._streams: dict[int, object] = {}
        self._cancelled: dict[int, set[str]] = {}

    def start(self, engine) -> None:
        self.engine = engine

    def dispatch(self, slot: WorkerSlot, message: dict) -> bool:
        self._cancelled[slot.index] = set()
        threading.Thread(target=self._stream, args=(slot, message), name=f"qistudio-ray-{slot.index}",
                         daemon=True).start()
        return True

    def cancel(self, slot: WorkerSlot, job_ids: list[str]) -> None:
        cancelled = self._cancelled.setdefault(slot.index, set())
        cancelled.update(job_ids)
        stream = self._streams.get(slot.index)
        if stream is not None and all(job.id in cancelled for job in slot.jobs):
            stream.cancel()

    def drain(self, slot: WorkerSlot) -> None:
        pass  # replicas belong to Ray Serve, which stops them with the application

    def stop(self, timeout: float) -> None:
        for stream in list(self._streams.values()):
            stream.cancel()

    def _stream(self, slot: WorkerSlot, message: dict) -> None:
        from ray.exceptions import TaskCancelledError
        from ray.serve.exceptions import RequestCancelledError

        engine = self.engine
        try:
            stream = self.handle.options(stream=True, method_name="run").remote(message)
            with engine.lock:
                self._streams[slot.index] = stream
                if slot.jobs and all(job.id in self._cancelled[slot.index] for job in slot.jobs):
                    stream.cancel()  # cancelled while the call was being made
            for reply in stream:
                with engine.lock:
                    self._deliver(slot, reply)
        except (RequestCancelledError, TaskCancelledError):
            with engine.lock:
                for job in list(slot.jobs):
                    engine.on_message(slot, {"type": "cancelled", "job": job.id})
                engine.on_message(slot, {"type": "idle", "memory": slot.memory})
        except Exception as error:  # noqa: BLE001  (the replica died or could not be reached: its jobs retry)
            with engine.lock:
                engine.on_worker_lost(slot, f"the Ray Serve replica running it failed ({type(error).__name__}: "
                                      f"{str(error).splitlines()[0] if str(error) else ''})")
                slot.restarts += 1
                engine.on_message(slot, {"type": "idle", "memory": slot.memory})
        finally:
            with engine.lock:
                self._streams.pop(slot.index, None)

    def _deliver(self, slot: WorkerSlot, reply: dict) -> None:
        cancelled = self._cancelled.get(slot.index, set())
        kind = reply["type"]
        if kind == "hello":
            slot.pid, slot.memory = reply["pid"], reply["memory"]
            slot.capacity = Capacity(self.max_batch_images, reply["free_bytes"], reply["bytes_per_row_pixel"])
            return
        if kind == "progress":
            reply = {**reply, "jobs": [j for j in reply["jobs"] if j not in cancelled]}
        elif kind == "result" and reply["job"] in cancelled:
            reply = {"type": "cancelled", "job": reply["job"]}
        self.engine.on_message(slot, reply)
