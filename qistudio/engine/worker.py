"""A worker process: load one pipeline on one device, then run the batches the engine sends until told to stop.

It talks to the engine over one duplex multiprocessing Connection, in plain messages (dicts of str, numbers,
bytes and lists). Engine -> worker: {"type": "run", "jobs": [...]}, {"type": "cancel", "jobs": [ids]},
{"type": "stop"}. Worker -> engine: "ready" (pid, capacity, memory) or "load_failed", then per batch "progress",
"result" / "failed" / "cancelled" per job, "capacity" after an out-of-memory split, and "idle". A "stop" that
arrives during a batch lets the batch finish first (drain). If the engine goes away, the connection reaches its
end and the worker exits. SIGINT is ignored here: a Ctrl-C in the terminal reaches the whole process group, and
the engine, not each worker, decides how running jobs end.
"""

from __future__ import annotations

import os
import signal

from .runner import BatchRunner, Task, message_of
from .spec import MAIN, from_wire


class Control:
    """Messages that arrive while a batch runs: cancellations, and a stop to honour once the batch is done."""

    def __init__(self, conn):
        self.conn = conn
        self.cancelled: set[str] = set()
        self.stopping = False

    def handle(self, message: dict) -> dict | None:
        """Record a cancel or stop; return a run message."""
        kind = message.get("type")
        if kind == "cancel":
            self.cancelled.update(message["jobs"])
        elif kind == "stop":
            self.stopping = True
        elif kind == "run":
            return message
        return None

    def poll(self) -> None:
        while self.conn.poll():
            if self.handle(self.conn.recv()) is not None:
                raise RuntimeError("the engine sent a batch to a busy worker")


def worker_main(index: int, device: str, spec, options: dict, conn) -> None:
    """The process's entry point (spawned by the engine)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # kernels that use "the current device" use this worker's
    try:
        runner = _start(device, spec, options, conn)
    except BaseException as error:  # noqa: BLE001  (reported to the engine, which decides)
        conn.send({"type": "load_failed", "error": message_of(error), "kind": type(error).__name__})
        return
    _serve(runner, conn)


def _start(device: str, spec, options: dict, conn) -> BatchRunner:
    from .device_memory import bytes_per_row_pixel, free_bytes, usage

    runner = new_runner(spec, device, options, Control(conn), conn.send)
    conn.send({"type": "ready", "pid": os.getpid(), "device": device, "free_bytes": free_bytes(device),
               "bytes_per_row_pixel": bytes_per_row_pixel(runner.pipe), "memory": usage(device)})
    return runner


def new_runner(spec, device: str, options: dict, control, send) -> BatchRunner:
    """The model loaded on `device` with its previewer and LoRA slots (a local or a Ray worker's)."""
    from .loras import LoRASlots
    from .models import load_pipeline
    from .previews import LatentPreviewer

    pipe = load_pipeline(spec, device)
    previewer = LatentPreviewer.fit(pipe) if options.get("preview_every") else None
    return BatchRunner(pipe, device, control, send, LoRASlots(pipe, options.get("max_loras", 8)), previewer,
                       options.get("preview_every", 0), _other_pipelines(spec, device, options))


def tasks_of(message: dict) -> list[Task]:
    """A run message's jobs as Tasks (images back as PIL)."""
    return [Task(job["id"], from_wire(job["arguments"]), job["scheduler"], [tuple(x) for x in job["loras"]],
                 job["lora_paths"], job.get("pipeline", MAIN)) for job in message["jobs"]]


def _other_pipelines(spec, device: str, options: dict):
    """name -> (pipe, LoRASlots) of the pipelines served beside the main one, each loaded on its first job."""
    loaded: dict = {}

    def get(name: str):
        from .loras import LoRASlots
        from .models import load_pipeline
        from .spec import LAYERED_PIPELINE

        if name not in loaded:
            if name != LAYERED_PIPELINE or spec.layered is None:
                raise RuntimeError(f"this worker serves no {name} pipeline")
            pipe = load_pipeline(spec.layered, device)
            loaded[name] = (pipe, LoRASlots(pipe, options.get("max_loras", 8)))
        return loaded[name]

    return get


def _serve(runner: BatchRunner, conn) -> None:
    from .device_memory import usage

    control = runner.control
    while not control.stopping:
        try:
            message = control.handle(conn.recv())
        except (EOFError, OSError):
            return  # the engine is gone
        if message is None:
            continue
        control.cancelled.intersection_update(job["id"] for job in message["jobs"])
        runner.run(tasks_of(message))
        control.cancelled.clear()
        conn.send({"type": "idle", "memory": usage(runner.device)})
