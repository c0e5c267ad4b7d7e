"""A Ray Serve replica that runs batches: the local worker's BatchRunner behind a streaming deployment method.

Ray gives each replica its own device (num_gpus=1 sets CUDA_VISIBLE_DEVICES, so the replica sees "cuda:0"), so a
replica loads the pipeline once and runs one batch at a time (the deployment's max_ongoing_requests=1). `run`
streams the same messages a local worker sends over its pipe, first a "hello" with what the engine's slot shows
(pid, memory, batching capacity), last an "idle". The engine cannot address one replica, so cancelling reaches a
replica only as the cancellation of its stream: the generator then marks every job of its batch cancelled and
waits until the runner stops at its next step, so that no batch runs behind the next one.
"""

from __future__ import annotations

import asyncio
import os

from .worker import new_runner, tasks_of

_DONE = object()


class StreamControl:
    """What BatchRunner asks between steps: the cancelled job ids (set from the stream's cancellation)."""

    def __init__(self):
        self.cancelled: set[str] = set()

    def poll(self) -> None:
        pass  # nothing to read: the replica's stream sets `cancelled` directly


class RayWorker:
    """The deployment class: `serve.deployment(RayWorker, ...).bind(model_spec, options)`."""

    def __init__(self, model, options: dict):
        import torch

        from .device_memory import bytes_per_row_pixel, free_bytes, usage

        self.device = "cuda:0" if torch.cuda.is_available() else "cpu"
        if options.get("threads") and self.device == "cpu":
            torch.set_num_threads(options["threads"])
        self.runner = new_runner(model, self.device, options, StreamControl(), None)
        self.hello = {"type": "hello", "pid": os.getpid(), "device": self.device,
                      "free_bytes": free_bytes(self.device), "bytes_per_row_pixel": bytes_per_row_pixel(self.runner.pipe)}
        self._usage = usage

    async def run(self, message: dict):
        """Run one batch ({"type": "run", "jobs": [...]}); yields the worker messages as they come."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        control = StreamControl()
        self.runner.control = control
        self.runner.send = lambda reply: loop.call_soon_threadsafe(queue.put_nowait, reply)
        tasks = tasks_of(message)
        running = loop.run_in_executor(None, self._run, tasks, queue, loop)
        yield {**self.hello, "memory": self._usage(self.device)}
        try:
            while (reply := await queue.get()) is not _DONE:
                yield reply
        except asyncio.CancelledError:
            control.cancelled.update(task.id for task in tasks)
            await asyncio.shield(running)  # the runner stops at its next step
            raise
        yield {"type": "idle", "memory": self._usage(self.device)}

    def _run(self, tasks, queue, loop) -> None:
        try:
            self.runner.run(tasks)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)
