"""Lazy, sharded, memory-mapped tensor reading, with every file's header checked before any tensor is read.

A `TensorSource` is the union of the tensors of several files (shards, with or without an index). Headers are
parsed up front and held to the same rules as the safetensors library (a JSON object; known dtypes; each tensor's
bytes matching its shape; the tensors tiling the data exactly, without gaps or overlaps), so a truncated, corrupt
or crafted file, or a tensor name present in two shards, fails with one `CheckpointError` naming the file and the
tensor before any weight is touched. Tensors are then read one at a time from the memory map, so a 40 GB
checkpoint never needs its size in RAM. Pickle is never used: `.bin`/`.pt`/`.pth` go through torch's
`weights_only` loader.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError
from .jsonfile import describe_type, parse_json, read_json

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
# The dtypes of the safetensors format that torch holds, with their torch types.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype for a dtype name as a header ("BF16") or a torch checkpoint ("bfloat16") gives it."""
    found = SAFETENSORS_DTYPES.get(name) or getattr(torch, name, None)
    return found if isinstance(found, torch.dtype) else None


def is_float_dtype(name: str) -> bool:
    dtype = torch_dtype(name)
    return dtype is not None and dtype.is_floating_point


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise CheckpointError(f"the header names {key!r} twice")
        seen[key] = value
    return seen


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: Path, name: str, info) -> tuple[int, int]:
    """The (start, end) byte offsets of one tensor entry, after checking its dtype, shape and size agree."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: corrupt entry for tensor {name!r} in the header ({describe_type(info)})")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {dtype!r}, which is not one qistudio reads "
            f"({', '.join(SAFETENSORS_DTYPES)})"
        )
    if not isinstance(shape, list) or not all(_natural(n) for n in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}; a shape is a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(n) for n in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {offsets!r}; expected [start, end] with "
                              "0 <= start <= end")
    start, end = offsets
    expected = SAFETENSORS_DTYPES[dtype].itemsize * math.prod(shape)
    if end - start != expected:
        raise CheckpointError(f"{path}: tensor {name!r} is {dtype} {shape}, which needs {expected} bytes, but its "
                              f"data_offsets span {end - start}")
    return start, end


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The tensors' byte ranges cover the data exactly once, as the safetensors library requires."""
    position, previous = 0, None
    for start, end, name in sorted(spans):
        if start < position:
            raise CheckpointError(f"{path}: tensors {previous!r} and {name!r} overlap (bytes {start}-{position} "
                                  "are claimed twice)")
        if start > position:
            raise CheckpointError(f"{path}: bytes {position}-{start} before tensor {name!r} belong to no tensor")
        position, previous = end, name
    if position != data_size:
        raise CheckpointError(f"{path}: {data_size - position} bytes after the last tensor belong to no tensor "
                              "(not a complete safetensors file)")


def read_safetensors_layout(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """({name: {dtype, shape, data_offsets}}, metadata) of a safetensors file, checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file (header claims {header_len} bytes, file has {size})"
            )
        raw = f.read(header_len)
    try:
        header = parse_json(raw, f"{path}: corrupt safetensors header", object_pairs_hook=_no_duplicates,
                            encoding="utf-8")
    except CheckpointError as e:
        message = str(e)
        raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: the header's __metadata__ must map names to strings")
    data_size = size - 8 - header_len
    spans = []
    for name, info in header.items():
        start, end = _check_entry(path, name, info)
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the data but the file holds {data_size}"
            )
        spans.append((start, end, name))
    _check_tiling(path, spans, data_size)
    return header, metadata


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file ({name: {dtype, shape, data_offsets}}), validated against its size."""
    return read_safetensors_layout(path)[0]


def _shard_path(index: Path, name) -> Path:
    relative = PurePosixPath(name) if isinstance(name, str) else None
    if relative is None or not name or "\\" in name or relative.is_absolute() or ".." in relative.parts:
        raise CheckpointError(f"{index}: the weight_map names shard {name!r}; shards are file names beside the index")
    return index.parent / relative


def expand_index(paths: list[Path]) -> list[Path]:
    """Replace `*.index.json` files by the shards they name (relative to the index)."""
    out: list[Path] = []
    for p in paths:
        if p.name.endswith(".index.json"):
            weight_map = read_json(p).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{p}: an index needs a non-empty \"weight_map\" object (tensor -> shard file)")
            shards = sorted({_shard_path(p, name) for name in weight_map.values()})
            missing = [str(s) for s in shards if not s.exists()]
            if missing:
                raise CheckpointError(f"{p}: the index names shards that are missing: {', '.join(missing)}")
            out.extend(shards)
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch checkpoint, through the weights-only loader (no pickle code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable file
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({e})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    # Bookkeeping entries (an epoch, a step count) are not weights.
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


class TensorSource:
    """Read-only view of all tensors in a set of checkpoint files."""

    def __init__(self, files: list[str | Path]):
        self.files = expand_index([Path(f) for f in files])
        if not self.files:
            raise CheckpointError("no checkpoint files were given")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.file_of: dict[str, Path] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        self.verified: set[str] = set()  # tensors already found finite (weights read again and again, from disk)
        self._torch_state: dict[Path, dict[str, torch.Tensor]] = {}
        self._handles: dict[Path, object] = {}
        for path in self.files:
            if not path.exists():
                raise CheckpointError(f"{path}: file not found")
            if path.is_dir():
                raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
            for name, (shape, dtype) in self._scan(path).items():
                if name in self.file_of:
                    raise CheckpointError(f"tensor {name!r} is in both {self.file_of[name]} and {path}")
                self.shapes[name], self.dtypes[name], self.file_of[name] = shape, dtype, path

    def _scan(self, path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
        if path.suffix in TORCH_SUFFIXES:
            state = self._torch_state[path] = _torch_state(path)
            return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}
        header, self.metadata[path] = read_safetensors_layout(path)
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
        try:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:  # the file changed since its header was checked
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None

    def where(self, name: str) -> str:
        """'<file>: tensor <name>' for messages."""
        return f"{self.file_of[name]}: tensor {name!r}"

    def close(self) -> None:
        self._handles.clear()
        self._torch_state.clear()
