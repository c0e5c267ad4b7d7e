"""Turning a DiT checkpoint (bf16 safetensors, any layout we load) into a GGUF or NF4 file: `qistudio quantize`.

The checkpoint is recognised as for loading (formats.py), written under our (diffusers / ComfyUI) names, one
tensor at a time: read (checked finite), quantised on `device`, appended (gguf_write.py, nf4_write.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .build import read_weight
from .errors import CheckpointError
from .formats import DIT, IGNORED, detect_layout
from .gguf_write import PRESETS, plan_types, write_gguf
from .nf4_write import is_nf4_target, write_nf4
from .quantized_source import open_source
from .safetensors_io import torch_dtype

QUANT_TYPES = (*PRESETS, "NF4")


def output_suffix(qtype: str) -> str:
    return ".safetensors" if qtype == "NF4" else ".gguf"


def quantize_dit(files: list[Path], output: str | Path, qtype: str, device="cpu", progress=None) -> dict[str, int]:
    """Write the DiT in `files` to `output` in `qtype` (a GGUF preset or "NF4"); returns {stored type: count}."""
    if qtype not in QUANT_TYPES:
        raise ValueError(f"quantisation type {qtype!r}; use one of {', '.join(QUANT_TYPES)}")
    source = open_source(files)
    try:
        where = ", ".join(map(str, source.files))
        layout = detect_layout(source.keys(), where)
        if layout.kind != DIT:
            raise CheckpointError(f"{where} holds a {layout.name}; qistudio quantize writes DiT checkpoints")
        keys = {layout.key_map(k): k for k in source.keys() if layout.key_map(k) != IGNORED}
        shapes = {name: tuple(source.shapes[key]) for name, key in keys.items()}
        dtypes = {name: torch_dtype(source.dtypes[key]) or torch.float32 for name, key in keys.items()}
        dtypes = {name: dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float32
                  for name, dtype in dtypes.items()}  # float8 and quantised sources: written from float32

        def read(name: str) -> torch.Tensor:
            return read_weight(source, keys[name], torch.float32, device)

        if qtype == "NF4":
            write_nf4(output, shapes, dtypes, read, device, progress)
            quantized = sum(is_nf4_target(name, shape) for name, shape in shapes.items())
            return {"NF4": quantized, "kept": len(shapes) - quantized}
        plan = plan_types(shapes, dtypes, qtype)
        write_gguf(output, shapes, plan, read, file_type=qtype, progress=progress)
        counts: dict[str, int] = {}
        for stored in plan.values():
            counts[stored] = counts.get(stored, 0) + 1
        return counts
    finally:
        source.close()
