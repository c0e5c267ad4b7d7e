"""Lazy, sharded, memory-mapped tensor reading, with every file's header checked before any tensor is read.

A `TensorSource` is the union of the tensors of several files (shards, with or without an index). Headers are
parsed up front, so a truncated or corrupt file, or a tensor name present in two shards, fails with a message
naming the file before any weight is touched. Tensors are then read one at a time from the memory map, so a 40 GB
checkpoint never needs its size in RAM. Pickle is never used: `.bin`/`.pt`/`.pth` go through torch's
`weights_only` loader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1}


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file ({name: {dtype, shape, data_offsets}}), validated against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file (header claims {header_len} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            expected = _DTYPE_SIZES.get(info["dtype"], 1) * int(torch.Size(info["shape"]).numel())
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r} in the header") from None
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the data but the file holds {data_size}"
            )
        if end - start != expected:
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r} ({end - start} bytes for {expected})")
    return header


def expand_index(paths: list[Path]) -> list[Path]:
    """Replace `*.index.json` files by the shards they name (relative to the index)."""
    out: list[Path] = []
    for p in paths:
        if p.name.endswith(".index.json"):
            weight_map = json.loads(p.read_text())["weight_map"]
            shards = sorted({p.parent / name for name in weight_map.values()})
            missing = [str(s) for s in shards if not s.exists()]
            if missing:
                raise CheckpointError(f"{p}: the index names shards that are missing: {', '.join(missing)}")
            out.extend(shards)
        else:
            out.append(p)
    return list(dict.fromkeys(out))


class TensorSource:
    """Read-only view of all tensors in a set of checkpoint files."""

    def __init__(self, files: list[str | Path]):
        self.files = expand_index([Path(f) for f in files])
        if not self.files:
            raise CheckpointError("no checkpoint files were given")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.file_of: dict[str, Path] = {}
        self._torch_state: dict[Path, dict[str, torch.Tensor]] = {}
        self._handles: dict[Path, object] = {}
        for path in self.files:
            if not path.exists():
                raise CheckpointError(f"{path}: file not found")
            for name, (shape, dtype) in self._scan(path).items():
                if name in self.file_of:
                    raise CheckpointError(f"tensor {name!r} is in both {self.file_of[name]} and {path}")
                self.shapes[name], self.dtypes[name], self.file_of[name] = shape, dtype, path

    def _scan(self, path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
        if path.suffix in TORCH_SUFFIXES:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any failure here means an unreadable file
                raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({e})") from None
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            self._torch_state[path] = state
            return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}
        header = read_safetensors_header(path)
        return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def keys(self):
        return self.shapes.keys()

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored (a CPU view into the memory map where possible)."""
        path = self.file_of[name]
        if path in self._torch_state:
            return self._torch_state[path][name]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()
        self._torch_state.clear()
