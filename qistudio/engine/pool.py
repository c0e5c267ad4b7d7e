"""The worker processes: spawning one per device slot, talking to it, and noticing when it dies.

Each worker is a `torch.multiprocessing` spawn process (a fresh interpreter: no CUDA state or locks inherited) with
one duplex Connection of its own. A private pipe per worker, rather than one queue all workers write to, means a
worker killed mid-message can only break its own pipe, never block or corrupt the others' reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .batching import Capacity

STARTING, IDLE, BUSY, DEAD, FAILED, STOPPED = "starting", "idle", "busy", "dead", "failed", "stopped"


@dataclass
class WorkerSlot:
    """One device's worker and what the engine knows of it; the process is replaced when it dies."""

    index: int
    device: str
    process: object = None
    conn: object = None
    state: str = STARTING
    pid: int | None = None
    jobs: list = field(default_factory=list)  # the Jobs of the batch it runs
    capacity: Capacity | None = None
    memory: dict = field(default_factory=dict)
    restarts: int = 0
    deaths: list = field(default_factory=list)  # times of recent deaths (restart-loop guard)
    error: str | None = None  # the last load failure or death, for /health
    stop_sent: bool = False
    started: float = field(default_factory=time.time)

    def summary(self) -> dict:
        out = {"index": self.index, "device": self.device, "state": self.state, "pid": self.pid,
               "restarts": self.restarts, "jobs": [job.id for job in self.jobs], "memory": dict(self.memory)}
        if self.error:
            out["error"] = self.error
        return out

    @property
    def alive(self) -> bool:
        return self.state in (STARTING, IDLE, BUSY)


def spawn(slot: WorkerSlot, spec, options: dict) -> None:
    """Start (or restart) the slot's worker process."""
    import torch.multiprocessing as mp

    from .worker import worker_main

    context = mp.get_context("spawn")
    parent, child = context.Pipe(duplex=True)
    process = context.Process(target=worker_main, args=(slot.index, slot.device, spec, options, child),
                              name=f"qistudio-worker-{slot.index}", daemon=True)
    process.start()
    child.close()  # the child holds its own copy; closing ours lets EOF mean "the worker is gone"
    slot.process, slot.conn, slot.state, slot.pid = process, parent, STARTING, process.pid
    slot.jobs, slot.stop_sent, slot.started = [], False, time.time()


def send(slot: WorkerSlot, message: dict) -> bool:
    """Send to the worker; False if its end is gone (the death is then handled through its sentinel)."""
    try:
        slot.conn.send(message)
        return True
    except (OSError, ValueError, EOFError):
        return False


def exit_description(process) -> str:
    process.join(timeout=5)
    code = process.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        import signal

        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def stop(slots: list[WorkerSlot], timeout: float) -> None:
    """Ask every live worker to stop, wait up to `timeout`, then terminate what is left."""
    for slot in slots:
        if slot.process is not None and slot.process.is_alive() and not slot.stop_sent:
            slot.stop_sent = send(slot, {"type": "stop"})
    deadline = time.monotonic() + timeout
    for slot in slots:
        if slot.process is None:
            continue
        slot.process.join(max(0.0, deadline - time.monotonic()))
        if slot.process.is_alive():
            slot.process.terminate()
            slot.process.join(5)
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join(5)
        slot.state = STOPPED
        if slot.conn is not None:
            slot.conn.close()
