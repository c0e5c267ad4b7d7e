"""Local worker processes: one spawned process per device slot, its pipe, and noticing when it dies.

Each worker is a `torch.multiprocessing` spawn process (a fresh interpreter: no CUDA state or locks inherited) with
one duplex Connection of its own. A private pipe per worker, rather than one queue all workers write to, means a
worker killed mid-message can only break its own pipe, never block or corrupt the others' reports. One thread
waits on every worker's connection and process sentinel at once (multiprocessing.connection.wait) and hands what
it reads to the engine; a dead worker's slot gets a new process, unless it died RESTART_LIMIT times within
RESTART_WINDOW seconds.

A pool offers the engine: `slots`, `start(engine)`, `dispatch(slot, message)`, `cancel(slot, job_ids)`,
`drain(slot)` (no more work for it: shutting down) and `stop(timeout)`; ray_pool.py offers the same over Ray Serve.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from .batching import Capacity

STARTING, IDLE, BUSY, DEAD, FAILED, STOPPED = "starting", "idle", "busy", "dead", "failed", "stopped"
RESTART_LIMIT, RESTART_WINDOW = 5, 300.0


@dataclass
class WorkerSlot:
    """One place work runs, and what the engine knows of it; a local slot's process is replaced when it dies."""

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

    def summary(self) -> dict:
        out = {"index": self.index, "device": self.device, "state": self.state, "pid": self.pid,
               "restarts": self.restarts, "jobs": [job.id for job in self.jobs], "memory": dict(self.memory)}
        if self.error:
            out["error"] = self.error
        return out

    @property
    def alive(self) -> bool:
        return self.state in (STARTING, IDLE, BUSY)


def exit_description(process) -> str:
    process.join(timeout=5)
    code = process.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class ProcessPool:
    def __init__(self, model, devices, options: dict):
        self.model, self.options = model, options
        self.slots = [WorkerSlot(i, device) for i, device in enumerate(devices)]
        self.engine = None
        self._running = False
        self._thread: threading.Thread | None = None

    # --- what the engine calls (under its lock, except start and stop) -------------------------------------------

    def start(self, engine) -> None:
        self.engine = engine
        with engine.lock:
            for slot in self.slots:
                self._spawn(slot)
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="qistudio-workers", daemon=True)
        self._thread.start()

    def dispatch(self, slot: WorkerSlot, message: dict) -> bool:
        """Send a batch; False if the worker's end is gone (its sentinel then reports the death)."""
        if self._send(slot, message):
            return True
        slot.state = DEAD
        return False

    def cancel(self, slot: WorkerSlot, job_ids: list[str]) -> None:
        self._send(slot, {"type": "cancel", "jobs": job_ids})

    def drain(self, slot: WorkerSlot) -> None:
        if not slot.stop_sent:
            slot.stop_sent = self._send(slot, {"type": "stop"})

    def stop(self, timeout: float) -> None:
        """Stop watching, ask every live worker to stop, wait up to `timeout`, then terminate what is left."""
        self._running = False
        if self._thread is not None:
            self._thread.join(5)
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                self.drain(slot)
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            if slot.process is None:
                continue
            slot.process.join(max(0.0, deadline - time.monotonic()))
            for end in (slot.process.terminate, slot.process.kill):
                if slot.process.is_alive():
                    end()
                    slot.process.join(5)
            slot.state = STOPPED
            if slot.conn is not None:
                slot.conn.close()

    # --- processes -----------------------------------------------------------------------------------------------

    def _spawn(self, slot: WorkerSlot) -> None:
        import torch.multiprocessing as mp

        from .worker import worker_main

        context = mp.get_context("spawn")
        parent, child = context.Pipe(duplex=True)
        process = context.Process(target=worker_main, args=(slot.index, slot.device, self.model, self.options, child),
                                  name=f"qistudio-worker-{slot.index}", daemon=True)
        process.start()
        child.close()  # the child holds its own copy; closing ours lets EOF mean "the worker is gone"
        slot.process, slot.conn, slot.state, slot.pid = process, parent, STARTING, process.pid
        slot.jobs, slot.stop_sent = [], False

    @staticmethod
    def _send(slot: WorkerSlot, message: dict) -> bool:
        try:
            slot.conn.send(message)
            return True
        except (OSError, ValueError, EOFError, AttributeError):
            return False

    def _loop(self) -> None:
        engine = self.engine
        while self._running:
            with engine.lock:
                watched = {}
                for slot in self.slots:
                    if slot.process is not None and slot.state not in (FAILED, STOPPED):
                        watched[slot.conn] = slot
                        watched[slot.process.sentinel] = slot
            for ready in wait(list(watched), timeout=0.2):
                slot = watched[ready]
                with engine.lock:
                    if ready is slot.conn:
                        self._read(slot)
                    elif slot.process is not None and ready == slot.process.sentinel:
                        self._read(slot)  # what it sent before dying counts
                        self._on_death(slot)

    def _read(self, slot: WorkerSlot) -> None:
        try:
            while slot.conn.poll():
                message = slot.conn.recv()
                if message["type"] == "load_failed":
                    slot.state, slot.error = FAILED, f"{message['kind']}: {message['error']}"
                    slot.process.join(5)
                    self.engine.on_slot_failed(slot)
                else:
                    self.engine.on_message(slot, message)
        except (EOFError, OSError):
            pass  # the worker is gone: its sentinel says so next

    def _on_death(self, slot: WorkerSlot) -> None:
        if slot.state in (FAILED, STOPPED):
            return
        slot.error = f"worker {slot.index} (pid {slot.pid}) {exit_description(slot.process)}"
        self.engine.on_worker_lost(slot, slot.error)
        now = time.time()
        slot.deaths = [t for t in slot.deaths if t > now - RESTART_WINDOW] + [now]
        if not self.engine.accepting:
            return
        if len(slot.deaths) > RESTART_LIMIT:
            slot.state = FAILED
            slot.error += f"; not restarted: it died {len(slot.deaths)} times in {RESTART_WINDOW:g} s"
            self.engine.on_slot_failed(slot)
            return
        slot.conn.close()
        slot.restarts += 1
        self._spawn(slot)
