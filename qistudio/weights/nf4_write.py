"""Writing a DiT as a bitsandbytes NF4 safetensors file (the layout diffusers and transformers save), streamed.

The block linears' weights become bitsandbytes 4-bit parts (`.weight` packed codes, `.weight.absmax` float32 per
64 values, `.weight.quant_map`, `.weight.quant_state.bitsandbytes__nf4` with the real shape); everything else is
kept as it is. safetensors' header lists every tensor's size up front, and those are known before any weight is
quantised, so the header is written first and the tensors appended one at a time: memory holds one tensor, not the
model. The file appears under its name only when complete (fileio.atomic_open).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable

import torch

from ..fileio import atomic_open
from ..ops.dequant import code_book
from ..ops.nf4_quantize import quantize_4bit

BLOCKSIZE = 64
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}


def is_nf4_target(name: str, shape: tuple[int, ...]) -> bool:
    """The DiT's block linears (what BitsAndBytesConfig quantises, less the few top-level layers)."""
    return name.startswith("transformer_blocks.") and name.endswith(".weight") and len(shape) == 2


def _state_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    state = {"quant_type": "nf4", "blocksize": BLOCKSIZE, "dtype": str(dtype).removeprefix("torch."),
             "shape": list(shape)}
    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)


def _layout(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]) -> list[tuple[str, str, tuple]]:
    """(name, safetensors dtype, shape) of every tensor the file will hold, in order."""
    entries = []
    for name, shape in shapes.items():
        if not is_nf4_target(name, shape):
            entries.append((name, _DTYPE_NAMES[dtypes[name]], tuple(shape)))
            continue
        count = math.prod(shape)
        state = _state_bytes(shape, dtypes[name])
        entries += [(name, "U8", (-(-count // 2), 1)), (f"{name}.absmax", "F32", (-(-count // BLOCKSIZE),)),
                    (f"{name}.quant_map", "F32", (16,)),
                    (f"{name}.quant_state.bitsandbytes__nf4", "U8", tuple(state.shape))]
    return entries


def _header(entries) -> bytes:
    header, offset = {}, 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    return struct.pack("<Q", len(raw)) + raw


def write_nf4(path: str | Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype],
              read: Callable[[str], torch.Tensor], device="cpu", progress=None) -> None:
    """Write the tensors `read(name)` gives (in `dtypes`), block linears in NF4, to a safetensors file at `path`."""
    names = list(shapes)
    with atomic_open(path) as f:
        f.write(_header(_layout(shapes, dtypes)))
        for name in names if progress is None else progress(names):
            tensor = read(name)
            if not is_nf4_target(name, shapes[name]):
                parts = [tensor.to(dtypes[name])]
            else:
                packed, absmax = quantize_4bit(tensor.to(device), "NF4", BLOCKSIZE)
                parts = [packed, absmax, code_book("NF4"), _state_bytes(shapes[name], dtypes[name])]
            for part in parts:
                f.write(part.contiguous().cpu().view(torch.uint8).numpy().tobytes())
