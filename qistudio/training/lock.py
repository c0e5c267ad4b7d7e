"""One run per output folder: a lock file naming the run that writes there, taken over once that run is gone.

Design note. `output_path/.qistudio-train.lock` holds JSON: the pid, host name, boot id (Linux's
/proc/sys/kernel/random/boot_id) and start time (field 22 of /proc/PID/stat, clock ticks since boot) of the process
that holds it, and the date it started. It appears with its content in one step (written to a temporary file, then
hard-linked to the lock's name, which fails when the name exists), so no reader sees it half-written. A run that
finds the lock takes it over, with a note, when its holder is gone: on this host, and the machine has rebooted since,
or no process has that pid, or the process with that pid started at another time (the pid was reused). A holder on
another host (a shared file system) cannot be checked: the run is refused, and the message says which file to
delete once that run is over. A second Trainer of the holding process shares its lock. The lock is deleted when the
run ends, however it ends in Python; after a kill -9 it stays, and the next run takes it over.

Two runs that find the same stale lock at the same moment could both take it over (the check and the replace are
two steps); each re-reads the lock after writing it, which narrows that window to microseconds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import RunLockedError

logger = logging.getLogger(__name__)

LOCK_FILE = ".qistudio-train.lock"
UNREADABLE_GRACE_S = 60  # a lock without readable content (a foreign writer, a hand edit) counts as stale this late
_held: dict[Path, list] = {}  # lock path -> [RunLock, count] for the locks this process holds


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    boot_id: str | None
    started: int | None  # the process's start time in clock ticks since boot (Linux), None where unknown
    since: str  # when the run took the lock, for people

    @classmethod
    def this_process(cls) -> "Holder":
        pid = os.getpid()
        return cls(pid, socket.gethostname(), boot_id(), process_start(pid), time.strftime("%Y-%m-%d %H:%M:%S"))

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.since}"


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), None when there is no such process or no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])  # fields after "(name)" start at field 3; 22 - 3 = 19
    except (OSError, ValueError, IndexError):
        return None


def holder_alive(holder: Holder) -> bool | None:
    """True or False where this machine can tell, None for a holder on another host (or where nothing tells)."""
    if holder.host != socket.gethostname():
        return None
    current_boot = boot_id()
    if holder.boot_id and current_boot:
        if holder.boot_id != current_boot:
            return False  # rebooted since: every process of that boot is gone
        if Path("/proc/self/stat").is_file():
            return holder.started is not None and process_start(holder.pid) == holder.started
    if os.name == "nt":
        return None  # os.kill would not merely probe there
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def read_holder(path: Path) -> Holder | None:
    """The holder a lock file names, None when it names none readably."""
    try:
        return Holder(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


class RunLock:
    """The lock of one output folder, held by this process; `release()` (or the end of a `with`) gives it back."""

    def __init__(self, path: Path, holder: Holder):
        self.path, self.holder = path, holder

    def release(self) -> None:
        entry = _held.get(self.path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[self.path]
        if read_holder(self.path) == self.holder:  # never delete a lock another run has taken over since
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(folder: str | os.PathLike) -> RunLock:
    """The output folder's lock for this run (creating the folder), or RunLockedError naming the run that holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_FILE).absolute()
    if path in _held:
        _held[path][1] += 1
        return _held[path][0]
    me = Holder.this_process()
    if not _create(path, me):
        _take_over_if_stale(path, folder, me)
    lock = RunLock(path, me)
    _held[path] = [lock, 1]
    return lock


def _create(path: Path, holder: Holder) -> bool:
    """Write the lock with its content in one step; False when it exists already."""
    temporary = path.with_name(f"{path.name}.{holder.pid}.{time.monotonic_ns()}.tmp")
    temporary.write_text(json.dumps(asdict(holder)) + "\n", encoding="utf-8")
    try:
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive creation, then the content
        try:
            with open(path, "x", encoding="utf-8") as f:
                f.write(temporary.read_text(encoding="utf-8"))
            return True
        except FileExistsError:
            return False
    finally:
        temporary.unlink(missing_ok=True)


def _take_over_if_stale(path: Path, folder: Path, me: Holder) -> None:
    holder = read_holder(path)
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:  # released in the meantime
            age = float("inf")
        if age < UNREADABLE_GRACE_S:
            raise RunLockedError(f"{path} exists but names no run readably; if no run is writing to {folder}, delete "
                                 "it and start again")
        note = "an unreadable lock file"
    elif holder.pid == me.pid and holder.host == me.host and holder.boot_id == me.boot_id \
            and holder.started == me.started:
        note = None  # this process's own lock, left by a lock object that was never released
    else:
        alive = holder_alive(holder)
        if alive is None:
            raise RunLockedError(f"another run may be writing to {folder}: its lock {path} names {holder.describe()}, "
                                 "which cannot be checked from here; give another --output_path, or delete the lock "
                                 "file once that run is over")
        if alive:
            raise RunLockedError(f"another run is writing to {folder} ({holder.describe()}); wait for it to end, stop "
                                 f"it, or give another --output_path (its lock: {path})")
        note = f"the run that held it ({holder.describe()}) is gone"
    staging = path.with_name(f"{path.name}.{me.pid}.{time.monotonic_ns()}.tmp")
    staging.write_text(json.dumps(asdict(me)) + "\n", encoding="utf-8")
    os.replace(staging, path)
    if read_holder(path) != me:
        raise RunLockedError(f"another run took over the lock {path} at the same moment; give another --output_path")
    if note:
        logger.warning("%s: %s (killed?); this run takes the lock over", path, note)
