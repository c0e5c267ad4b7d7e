"""Reading GGUF files: the header checked in full, then tensors as views into a memory map (no copy of the file).

Design note. A GGUF file is a little-endian header (magic "GGUF", version 2 or 3, key/value metadata, then one
entry per tensor: name, dims innermost first, GGML type, offset) followed by the aligned tensor data. Like
safetensors_io, the whole header is parsed and held to the format's rules before a byte of weight is read: known
types (an unknown id is one error naming it), the innermost dimension a whole number of blocks, every tensor's
bytes inside the file, aligned, not overlapping another's, names unique; a truncated or crafted file is one
`CheckpointError` naming the file and the tensor. The data is memory-mapped (torch.from_file, private: nothing is
read until used, nothing written back), so a 12 GB Q4_K_M file costs no RAM until its tensors are copied out.

Shapes are given in torch order (outermost first: a linear weight is (out, in)), the reverse of GGUF's. A tensor
that ComfyUI-GGUF's converter reshaped to rows of 256 keeps its real shape in `comfy.gguf.orig_shape.<name>`;
that shape is the tensor's shape here (its bytes are the same row-major blocks either way).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..ops.dequant import GGML_TYPES
from .errors import CheckpointError

GGUF_SUFFIX = ".gguf"
MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
ORIGINAL_SHAPE_KEY = "comfy.gguf.orig_shape."
# Metadata value types: id -> struct format of a scalar (8: string, 9: array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str  # GGML type: "Q4_K", "F32", ...
    shape: tuple[int, ...]  # torch order
    stored_shape: tuple[int, ...]  # torch order, as the file lays the rows out (differs from `shape` when reshaped)
    offset: int  # absolute, in the file
    nbytes: int


class _Reader:
    """Bounds-checked little-endian reads over the header bytes."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.position = path, data, 0

    def take(self, count: int, what: str) -> bytes:
        if count < 0 or self.position + count > len(self.data):
            raise CheckpointError(f"{self.path}: truncated GGUF header (reading {what} at byte {self.position})")
        chunk = self.data[self.position : self.position + count]
        self.position += count
        return chunk

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.scalar("<Q", what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what} is not UTF-8 text") from None

    def value(self, kind: int, what: str, depth: int = 0):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY and depth == 0:
            item_kind, count = self.scalar("<I", what), self.scalar("<Q", what)
            if count > len(self.data):  # every item takes at least a byte
                raise CheckpointError(f"{self.path}: {what} claims {count} items, more than the header holds")
            return [self.value(item_kind, what, depth + 1) for _ in range(count)]
        raise CheckpointError(f"{self.path}: {what} has value type {kind}, which GGUF does not define")


def _metadata(reader: _Reader, count: int) -> dict:
    metadata = {}
    for index in range(count):
        key = reader.string(f"metadata key {index}")
        kind = reader.scalar("<I", f"the type of metadata {key!r}")
        if key in metadata:
            raise CheckpointError(f"{reader.path}: the header names metadata {key!r} twice")
        metadata[key] = reader.value(kind, f"metadata {key!r}")
    return metadata


def _original_shape(path: Path, metadata: dict, name: str, stored: tuple[int, ...]) -> tuple[int, ...]:
    shape = metadata.get(ORIGINAL_SHAPE_KEY + name)
    if shape is None:
        return stored
    if (not isinstance(shape, list) or not shape or not all(isinstance(n, int) and n >= 0 for n in shape)
            or math.prod(shape) != math.prod(stored)):
        raise CheckpointError(f"{path}: {ORIGINAL_SHAPE_KEY}{name} = {shape!r} does not hold the tensor's "
                              f"{math.prod(stored)} values (stored as {list(stored)})")
    return tuple(shape)


def _tensor_entry(reader: _Reader, index: int) -> tuple[str, tuple[int, ...], int, int]:
    name = reader.string(f"the name of tensor {index}")
    n_dims = reader.scalar("<I", f"the dimensions of tensor {name!r}")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise CheckpointError(f"{reader.path}: tensor {name!r} has {n_dims} dimensions (GGUF allows 1-{_MAX_DIMS})")
    dims = tuple(reader.scalar("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims))
    type_id = reader.scalar("<I", f"the type of tensor {name!r}")
    offset = reader.scalar("<Q", f"the offset of tensor {name!r}")
    return name, dims, type_id, offset


def _check_type(path: Path, name: str, dims: tuple[int, ...], type_id: int) -> int:
    """The tensor's size in bytes, after checking its type is known and its rows are whole blocks."""
    kind = GGML_TYPES.get(type_id)
    if kind is None:
        raise CheckpointError(f"{path}: tensor {name!r} has GGML type id {type_id}, which qistudio does not know "
                              f"(known: {', '.join(t.name for t in GGML_TYPES.values())})")
    if dims[0] % kind.block:
        raise CheckpointError(f"{path}: tensor {name!r} is {kind.name} with rows of {dims[0]} values, not a whole "
                              f"number of {kind.block}-value blocks")
    return kind.row_bytes(dims[0]) * math.prod(dims[1:])


def read_gguf_layout(path: str | Path) -> tuple[dict[str, GGUFTensor], dict]:
    """({name: GGUFTensor}, metadata) of a GGUF file, every entry checked against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(f"{path}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _parse(_Reader(path, data), size)


def _parse(reader: _Reader, size: int) -> tuple[dict[str, GGUFTensor], dict]:
    path = reader.path
    if reader.take(4, "the magic number") != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    version = reader.scalar("<I", "the version")
    if version not in (2, 3):
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        detail = " (a big-endian file: convert it to little-endian)" if swapped in (2, 3) else ""
        raise CheckpointError(f"{path}: GGUF version {version}; qistudio reads versions 2 and 3{detail}")
    tensor_count = reader.scalar("<Q", "the tensor count")
    metadata_count = reader.scalar("<Q", "the metadata count")
    if tensor_count > size or metadata_count > size:
        raise CheckpointError(f"{path}: corrupt GGUF header ({tensor_count} tensors, {metadata_count} metadata "
                              f"entries in a {size}-byte file)")
    metadata = _metadata(reader, metadata_count)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: general.alignment = {alignment!r}; expected a power of two")
    entries = [_tensor_entry(reader, i) for i in range(tensor_count)]
    data_start = -(-reader.position // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, type_id, offset in entries:
        if name in tensors:
            raise CheckpointError(f"{path}: the header names tensor {name!r} twice")
        nbytes = _check_type(path, name, dims, type_id)
        if offset % alignment:
            raise CheckpointError(f"{path}: tensor {name!r} starts at offset {offset}, not a multiple of the "
                                  f"alignment {alignment}")
        start = data_start + offset
        if start + nbytes > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {start + nbytes} but the file "
                                  f"holds {size}")
        stored = tuple(reversed(dims))
        shape = _original_shape(path, metadata, name, stored)
        tensors[name] = GGUFTensor(name, GGML_TYPES[type_id].name, shape, stored, start, nbytes)
    _check_overlaps(path, tensors)
    return tensors, metadata


def _check_overlaps(path: Path, tensors: dict[str, GGUFTensor]) -> None:
    end, previous = 0, None
    for tensor in sorted(tensors.values(), key=lambda t: t.offset):
        if tensor.offset < end:
            raise CheckpointError(f"{path}: tensors {previous!r} and {tensor.name!r} overlap")
        end, previous = max(end, tensor.offset + tensor.nbytes), tensor.name


class GGUFFile:
    """One GGUF file: its checked layout, and its tensors as read-only views into a private memory map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors, self.metadata = read_gguf_layout(self.path)
        self._map: torch.Tensor | None = None

    def _bytes(self) -> torch.Tensor:
        if self._map is None:
            size = self.path.stat().st_size
            self._map = torch.from_file(str(self.path), shared=False, size=size, dtype=torch.uint8)
        return self._map

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as stored, (rows..., row bytes) uint8: a view, nothing copied."""
        tensor = self.tensors[name]
        rows = tensor.stored_shape[:-1]
        view = self._bytes()[tensor.offset : tensor.offset + tensor.nbytes]
        return view.view(*rows, tensor.nbytes // max(1, math.prod(rows)))

    def close(self) -> None:
        self._map = None  # the mapping ends once no view of it is left
