"""Atomic file writes: a temporary file in the target's folder, renamed over the target only once complete.

Design note. A reader (or a run killed half-way) sees the old file or the new one, never a half-written one:
the bytes go to `.<name>.<random>.tmp` beside the target and `os.replace` (atomic within one file system) puts
them in place. `tempfile.mkstemp` creates that file with mode 0600, private to the writer; an image, a LoRA or
a config the user asked for should get the mode any new file would get, 0666 less the umask (0644 by default),
so the mode is set from the umask before the rename. Imports nothing heavy: the command line uses it too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux's /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere it can only be read by setting it: set it back at once
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that takes a file name (safetensors' save_file, PIL): renamed
    onto `path` with the umask's mode when the block ends without error, removed if it raises."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, new_file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """`open(path, mode)` for writing, atomically: the file is closed, then renamed into place."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes a whole new file: mode must start with 'w', got {mode!r}")
    with atomic_path(path) as temporary, open(temporary, mode, encoding=encoding) as handle:
        yield handle


def unwritable_folder_reason(folder: str | os.PathLike) -> str | None:
    """Why a new file cannot be written into `folder` (missing, not a folder, no permission, a read-only file
    system), or None when it can: found by creating and removing a temporary file there, which is what an atomic
    write will do, so the answer holds for root and for any file system."""
    folder = Path(folder)
    if not folder.exists():
        return f"the folder {folder} does not exist"
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".qistudio-write-test.", suffix=".tmp")
    except OSError as e:
        return f"cannot write into the folder {folder} ({e.strerror or e})"
    os.close(handle)
    os.unlink(probe)
    return None


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)
