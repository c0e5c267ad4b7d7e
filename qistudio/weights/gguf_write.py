"""Writing a DiT as a GGUF file the way ComfyUI-GGUF's Qwen-Image files are laid out, one tensor at a time.

Layout: architecture "qwen_image", tensors under the diffusers / ComfyUI names without a prefix
(`transformer_blocks.0.attn.to_q.weight`), 1-D tensors (biases, norms) in F32, the few weights outside the blocks
(img_in, txt_in, the timestep embedder, norm_out, proj_out: small, and they touch every token or the output) in
the source's precision, and the block linears in the preset's type. Presets follow llama.cpp's names: Q8_0, Q4_0,
Q6_K, Q5_K_S / Q4_K_S (every block linear in Q5_K / Q4_K) and Q5_K_M / Q4_K_M (the same, with the attention value
projections and the MLP down projections in Q6_K for a quarter or so of the blocks: the first and last eighth and
every third between, llama.cpp's `use_more_bits` rule). A weight whose rows are not whole blocks of its type falls
back to Q8_0 (rows of 32), else to the source's precision.

The header (every tensor's name, shape and type) is written first, then each tensor is quantised and appended,
so memory holds one tensor at a time; the file appears under its name only when complete (fileio.atomic_path).
Needs the gguf package (the `gguf` extra).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from ..fileio import atomic_path
from ..ops.dequant import GGML_BY_NAME
from ..ops.gguf_quantize import quantize_gguf

PRESETS = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "BF16", "F16")
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
_MORE_BITS = (".attn.to_v.", ".attn.add_v_proj.", ".net.2.")  # value projections, MLP down projections
ARCHITECTURE = "qwen_image"


def _use_more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _float_type(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, "F32")


def plan_types(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype], preset: str) -> dict[str, str]:
    """Tensor name -> the GGUF type it is written in, for a DiT's tensors (our names) and a preset."""
    if preset not in PRESETS:
        raise ValueError(f"quantisation preset {preset!r}; use one of {', '.join(PRESETS)}")
    layers = 1 + max((int(m.group(1)) for name in shapes if (m := _BLOCK.match(name))), default=-1)
    plan = {}
    for name, shape in shapes.items():
        source_type = _float_type(dtypes[name])
        block = _BLOCK.match(name)
        if len(shape) != 2 or not name.endswith(".weight"):
            plan[name] = "F32"
            continue
        if block is None or preset in ("BF16", "F16"):
            plan[name] = preset if block is not None else source_type
            continue
        wanted = preset.removesuffix("_S").removesuffix("_M")
        if preset in ("Q4_K_M", "Q5_K_M") and any(part in name for part in _MORE_BITS) and _use_more_bits(
                int(block.group(1)), layers):
            wanted = "Q6_K"
        for candidate in (wanted, "Q8_0", source_type):
            if shape[1] % GGML_BY_NAME[candidate].block == 0:
                plan[name] = candidate
                break
    return plan


def _encoded(tensor: torch.Tensor, qtype: str):
    """A tensor in GGUF type `qtype` as the numpy array the writer appends."""
    if qtype == "F32":
        return tensor.float().cpu().numpy()
    if qtype == "F16":
        return tensor.half().cpu().numpy()
    if qtype == "BF16":
        return tensor.to(torch.bfloat16).cpu().view(torch.uint8).numpy()
    return quantize_gguf(tensor, qtype).cpu().numpy()


def _stored_shape(shape: tuple[int, ...], qtype: str) -> tuple[int, ...]:
    kind = GGML_BY_NAME[qtype]
    if qtype in ("F32", "F16"):
        return shape
    return (*shape[:-1], kind.row_bytes(shape[-1]))


def write_gguf(path: str | Path, shapes: dict[str, tuple[int, ...]], plan: dict[str, str],
               read: Callable[[str], torch.Tensor], file_type: str | None = None, progress=None) -> None:
    """Write the tensors `read(name)` gives, in `plan`'s types, to a GGUF file at `path` (atomically)."""
    import gguf
    import numpy as np

    names = list(plan)
    with atomic_path(path) as temporary:
        writer = gguf.GGUFWriter(str(temporary), arch=ARCHITECTURE)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if file_type is not None:
            writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{file_type}"].value)
        for name in names:
            qtype, shape = plan[name], tuple(shapes[name])
            stored = _stored_shape(shape, qtype)
            numpy_dtype = {"F32": np.float32, "F16": np.float16}.get(qtype, np.uint8)
            nbytes = int(np.prod(stored)) * np.dtype(numpy_dtype).itemsize
            raw_type = None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
            writer.add_tensor_info(name, stored, np.dtype(numpy_dtype), nbytes, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name in names if progress is None else progress(names):
            writer.write_tensor_data(_encoded(read(name), plan[name]))
        writer.close()
