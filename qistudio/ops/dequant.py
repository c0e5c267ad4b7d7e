"""Dequantising GGUF (GGML) blocks and bitsandbytes 4-bit / 8-bit weights in torch, with the references' roundings.

Design note. The files people run are GGUF files made for ComfyUI-GGUF (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, ...)
and bitsandbytes NF4 / int8 checkpoints. diffusers 0.42.1 and ComfyUI-GGUF dequantise GGML blocks in float16
arithmetic (each block's float16 scale times the integer codes, rounded to float16 at every step: d * q, then
- m), then cast to the compute dtype; llama.cpp works in float32. We follow diffusers/ComfyUI, step for step, so a
weight we compute with is the same bits as theirs (tests/test_gguf_dequant.py checks every type against
diffusers' functions, and against the gguf package's float32 reference within float16 rounding). IQ4_NL and
IQ4_XS look their codes up in a float32 table, so they come out in float32, as in diffusers.

bitsandbytes 4-bit: two codes per byte (high nibble first) over the flattened weight, one float32 absmax per
`blocksize` codes (or, "nested", the absmaxes themselves 8-bit: code2[q] * absmax2[block of 256] + offset), a
value being code_book[code] * absmax in float32, then cast; as bitsandbytes' dequantize_4bit does. Its int8
(LLM.int8) files keep int8 rows and a float32 row scale SCB: W = q * SCB / 127 (bitsandbytes'
int8_vectorwise_dequant, the reciprocal 1/127 multiplied).

Everything here is stateless: raw tensors in, a dense weight out. `GGML_TYPES` is the GGUF type table (ids, block
sizes) so that reading a file needs no other package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GGMLType:
    name: str
    id: int
    block: int  # weights per block
    nbytes: int  # bytes per block

    def row_bytes(self, columns: int) -> int:
        return columns // self.block * self.nbytes


# The GGUF specification's tensor types (ggml.h; ids 4, 5 and 31-33, 36-38 were retired upstream).
GGML_TYPES = {t.id: t for t in (
    GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2), GGMLType("Q4_0", 2, 32, 18), GGMLType("Q4_1", 3, 32, 20),
    GGMLType("Q5_0", 6, 32, 22), GGMLType("Q5_1", 7, 32, 24), GGMLType("Q8_0", 8, 32, 34),
    GGMLType("Q8_1", 9, 32, 40), GGMLType("Q2_K", 10, 256, 84), GGMLType("Q3_K", 11, 256, 110),
    GGMLType("Q4_K", 12, 256, 144), GGMLType("Q5_K", 13, 256, 176), GGMLType("Q6_K", 14, 256, 210),
    GGMLType("Q8_K", 15, 256, 292), GGMLType("IQ2_XXS", 16, 256, 66), GGMLType("IQ2_XS", 17, 256, 74),
    GGMLType("IQ3_XXS", 18, 256, 98), GGMLType("IQ1_S", 19, 256, 50), GGMLType("IQ4_NL", 20, 32, 18),
    GGMLType("IQ3_S", 21, 256, 110), GGMLType("IQ2_S", 22, 256, 82), GGMLType("IQ4_XS", 23, 256, 136),
    GGMLType("I8", 24, 1, 1), GGMLType("I16", 25, 1, 2), GGMLType("I32", 26, 1, 4), GGMLType("I64", 27, 1, 8),
    GGMLType("F64", 28, 1, 8), GGMLType("IQ1_M", 29, 256, 56), GGMLType("BF16", 30, 1, 2),
    GGMLType("TQ1_0", 34, 256, 54), GGMLType("TQ2_0", 35, 256, 66), GGMLType("MXFP4", 39, 32, 17),
    GGMLType("NVFP4", 40, 64, 36), GGMLType("Q1_0", 41, 128, 18),
)}  # fmt: skip
GGML_BY_NAME = {t.name: t for t in GGML_TYPES.values()}
# Element types torch holds as they are (a GGUF tensor of these is an ordinary tensor).
GGML_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                     "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}


# --- helpers over a (n_blocks, block bytes) uint8 tensor -----------------------------------------------------------


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 stored at byte `start` of every block, (n, 1)."""
    return blocks[:, start : start + 2].view(torch.float16)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k) codes: every low nibble, then every high one (GGML's order within a group)."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """(n, g, k) bytes -> (n, g, 8 / width, k) fields of `width` bits, the lowest first."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device).view(1, 1, -1, 1)
    return (packed.unsqueeze(2) >> shifts) & ((1 << width) - 1)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (uint8, (n, 8) each)."""
    low, mins, high = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    scale = torch.cat([low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)], dim=1)
    minimum = torch.cat([mins & 0x3F, (high >> 4) | ((mins >> 2) & 0x30)], dim=1)
    return scale, minimum


def _q5_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1: 4 bytes -> 32 fifth bits, bit j (little-endian) for element j, (n, 32)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


# --- one function per GGML type: (n, nbytes) uint8 -> (n, block) dequantised, in float16 unless said ----------------


def _q8_0(blocks):
    return _half(blocks, 0) * blocks[:, 2:].view(torch.int8)


def _q4_0(blocks):
    return _half(blocks, 0) * (_nibbles(blocks[:, 2:]).to(torch.int8) - 8)


def _q4_1(blocks):
    return _half(blocks, 0) * _nibbles(blocks[:, 4:]) + _half(blocks, 2)


def _q5_0(blocks):
    codes = _nibbles(blocks[:, 6:]) | (_q5_high_bits(blocks[:, 2:6]) << 4)
    return _half(blocks, 0) * (codes.to(torch.int8) - 16)


def _q5_1(blocks):
    codes = _nibbles(blocks[:, 8:]) | (_q5_high_bits(blocks[:, 4:8]) << 4)
    return _half(blocks, 0) * codes + _half(blocks, 2)


def _q2_k(blocks):
    n = blocks.shape[0]
    scales, d, dmin = blocks[:, 0:16], _half(blocks, 80), _half(blocks, 82)
    step, offset = (d * (scales & 0x0F)).unsqueeze(-1), (dmin * (scales >> 4)).unsqueeze(-1)  # (n, 16, 1)
    codes = _bits(blocks[:, 16:80].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    return (step * codes - offset).reshape(n, 256)


def _q3_k(blocks):
    n = blocks.shape[0]
    hmask, packed, raw_scales, d = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108], _half(blocks, 108)
    low = _bits(raw_scales[:, 0:8].unsqueeze(1), 4).reshape(n, 16)
    high = _bits(raw_scales[:, 8:12].unsqueeze(1), 2).reshape(n, 16)
    scales = (low | (high << 4)).to(torch.int8) - 32
    step = (d * scales).unsqueeze(-1)  # (n, 16, 1)
    codes = _bits(packed.reshape(n, 2, 32), 2).reshape(n, 16, 16)
    missing_high = _bits(hmask.reshape(n, 1, 32), 1).reshape(n, 16, 16) ^ 1  # a clear bit subtracts 4
    return (step * (codes.to(torch.int8) - (missing_high << 2).to(torch.int8))).reshape(n, 256)


def _k_steps(blocks):
    """Q4_K / Q5_K: per sub-block of 32, (d * scale, dmin * min) in float16, (n, 8, 1) each."""
    scale, minimum = _k_scales(blocks[:, 4:16])
    return (_half(blocks, 0) * scale).unsqueeze(-1), (_half(blocks, 2) * minimum).unsqueeze(-1)


def _q4_k(blocks):
    n = blocks.shape[0]
    step, offset = _k_steps(blocks)
    codes = _bits(blocks[:, 16:144].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    return (step * codes - offset).reshape(n, 256)


def _q5_k(blocks):
    n = blocks.shape[0]
    step, offset = _k_steps(blocks)
    low = _bits(blocks[:, 48:176].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    high = _bits(blocks[:, 16:48].reshape(n, 1, 32), 1).reshape(n, 8, 32)
    return (step * (low | (high << 4)) - offset).reshape(n, 256)


def _q6_k(blocks):
    n = blocks.shape[0]
    step = (_half(blocks, 208) * blocks[:, 192:208].view(torch.int8)).unsqueeze(-1)  # (n, 16, 1)
    low = _bits(blocks[:, 0:128].reshape(n, 2, 64), 4).reshape(n, 8, 32)
    high = _bits(blocks[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 8, 32)
    codes = (low | (high << 4)).to(torch.int8) - 32
    return (step * codes.reshape(n, 16, 16)).reshape(n, 256)


# IQ4_NL / IQ4_XS: a non-uniform 4-bit code book, looked up in float32.
_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_lookup(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(_IQ4_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def _iq4_nl(blocks):
    return _half(blocks, 0) * _iq4_lookup(_nibbles(blocks[:, 2:]))


def _iq4_xs(blocks):
    n = blocks.shape[0]
    d, high_bits, low_bits = _half(blocks, 0), blocks[:, 2:4].view(torch.int16), blocks[:, 4:8]
    low = _nibbles(low_bits.unsqueeze(-1)).reshape(n, 8)  # scale j: low nibble of byte j // 2 (j even), else high
    shifts = torch.arange(0, 16, 2, dtype=torch.uint8, device=blocks.device).view(1, 8)
    high = (high_bits >> shifts) & 0x03  # int16 (n, 8)
    step = (d * ((low | (high << 4)) - 32)).unsqueeze(-1)  # float16 (n, 8, 1)
    codes = _nibbles(blocks[:, 8:136].reshape(n, 8, 16))  # (n, 8, 32)
    return (step * _iq4_lookup(codes)).reshape(n, 256)


def _bf16(blocks):
    return (blocks.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


GGUF_DEQUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q2_K": _q2_k,
                     "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "IQ4_NL": _iq4_nl,
                     "IQ4_XS": _iq4_xs, "BF16": _bf16}
# The types a layer keeps quantised and dequantises per use (the rest of what the gguf package reads is decoded
# once at load, weights/quantized_source.py).
KEPT_QUANTIZED = tuple(name for name in GGUF_DEQUANTIZERS if name != "BF16")


def dequantize_gguf(raw: torch.Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A GGUF tensor's bytes (any shape whose size is a whole number of blocks) -> `shape` in `dtype`, with
    diffusers' / ComfyUI-GGUF's roundings (float16 arithmetic inside a block, then one cast)."""
    kind = GGML_BY_NAME[qtype]
    blocks = raw.reshape(-1, kind.nbytes)
    return GGUF_DEQUANTIZERS[qtype](blocks).reshape(shape).to(dtype)


def q8_0_float32(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Q8_0 bytes -> `shape` in float32, exactly: a float16 scale times an int8 code has at most 18 significant bits,
    so float32 holds every product without rounding (unlike diffusers' float16 arithmetic)."""
    blocks = raw.reshape(-1, GGML_BY_NAME["Q8_0"].nbytes)
    return (_half(blocks, 0).float() * blocks[:, 2:].view(torch.int8).float()).reshape(shape)


# --- bitsandbytes ------------------------------------------------------------------------------------------------

# bitsandbytes' 4-bit code books (float32), as its dequantize_4bit uses them (a file's quant_map is not read).
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
FP4_CODE = (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
            0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204,
            -0.25)
CODE_BOOKS = {"NF4": NF4_CODE, "FP4": FP4_CODE}
NESTED_BLOCKSIZE = 256  # bitsandbytes' blocks of the 8-bit absmaxes ("compress_statistics")


def code_book(qtype: str, device=None) -> torch.Tensor:
    return torch.tensor(CODE_BOOKS[qtype], dtype=torch.float32, device=device)


def absmax_4bit(absmax: torch.Tensor, nested_absmax: torch.Tensor | None = None,
                nested_code: torch.Tensor | None = None, offset: float = 0.0) -> torch.Tensor:
    """The float32 absmax per block: as stored, or decoded from its 8-bit form (code2[q] * absmax2 + offset)."""
    if nested_absmax is None:
        return absmax.float()
    n = absmax.numel()
    values = nested_code[absmax.long()]
    full = n - n % NESTED_BLOCKSIZE
    scaled = torch.cat([(values[:full].view(-1, NESTED_BLOCKSIZE) * nested_absmax[: full // NESTED_BLOCKSIZE, None])
                        .view(-1), values[full:] * nested_absmax[full // NESTED_BLOCKSIZE :][:1]])
    return scaled + offset


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: tuple[int, ...],
                    blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes NF4/FP4: packed codes (two per byte, high nibble first, over the flattened weight) and float32
    block absmaxes -> `shape` in `dtype` (code[q] * absmax in float32, then one cast)."""
    n = 1
    for size in shape:
        n *= size
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n]
    values = code[codes.long()]
    full = n - n % blocksize
    out = torch.cat([(values[:full].view(-1, blocksize) * absmax[: full // blocksize, None]).view(-1),
                     values[full:] * absmax[full // blocksize :][:1]])
    return out.view(shape).to(dtype)


INT8_RECIPROCAL = 7.874015718698502e-3  # bitsandbytes' 1 / 127 in its int8_vectorwise_dequant


def dequantize_int8(weight: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes LLM.int8 rows: q * SCB[:, None] / 127 (as q * SCB * (1 / 127) in float32), then cast."""
    return (weight * row_scale.view(-1, 1) * INT8_RECIPROCAL).to(dtype)
