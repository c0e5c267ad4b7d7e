"""Atomic writes (qistudio.fileio): whole or nothing, and the mode the user's umask gives, for every writer."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

from qistudio.fileio import atomic_open, atomic_path, current_umask, new_file_mode, write_text_atomic

PACKAGE = Path(__file__).resolve().parents[1] / "qistudio"


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_umask_is_read_without_changing_it(umask):
    assert current_umask() == umask and new_file_mode() == 0o666 & ~umask
    assert current_umask() == umask


def _save_png(path):
    from qistudio.imageio import save_png

    save_png(Image.new("RGB", (4, 4)), path, {"prompt": "x"})


def _write_lora(path):
    from qistudio.lora.files import write_safetensors

    write_safetensors({"a.lora_A.weight": torch.ones(2, 2)}, path)


def _write_training_text(path):
    from qistudio.training.outputs import write_text_atomic as training_write

    training_write(path, "{}\n")


@pytest.mark.parametrize("writer, name", [
    (lambda p: write_text_atomic(p, "text"), "a.txt"), (_save_png, "image.png"), (_write_lora, "lora.safetensors"),
    (_write_training_text, "training_config.json"),
])  # fmt: skip
def test_outputs_get_the_umask_mode_and_leave_no_temporary(tmp_path, umask, writer, name):
    path = tmp_path / name
    writer(path)
    assert _mode(path) == 0o666 & ~umask  # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    writer(path)  # over an existing file
    assert _mode(path) == 0o666 & ~umask and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(path, "w") as handle:
            handle.write("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "new.bin") as temporary:
            temporary.write_bytes(b"x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_open_only_writes_whole_files(tmp_path):
    with pytest.raises(ValueError, match="mode must start with 'w'"):
        with atomic_open(tmp_path / "x", "a"):
            pass
    with atomic_open(tmp_path / "x", "wb") as handle:
        handle.write(b"\x00\x01")
    assert (tmp_path / "x").read_bytes() == b"\x00\x01"


def test_every_temporary_file_goes_through_fileio():
    """mkstemp's private 0600 files reached users once; new writers use qistudio.fileio instead."""
    pattern = re.compile(r"\bmkstemp\(|NamedTemporaryFile\(")
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name != "fileio.py" and pattern.search(p.read_text())]
    assert offenders == []
