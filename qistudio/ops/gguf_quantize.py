"""Quantising float weights to GGUF blocks (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K) in torch, on any device.

Design note. Q8_0 and Q4_0 follow the gguf package's quantisers operation for operation (float32 scale, its
reciprocal, rounding half away from zero), so the bytes are the same as `gguf.quants.quantize` writes
(tests/test_gguf_quantize.py); in torch they run on a GPU, where the package's numpy code would take most of an hour
for a 20B model. The package has no K-quant quantiser; ours is a simple, vectorised one: per sub-block, a scale
and min from the values' range refined twice by least squares over the chosen codes (llama.cpp searches more
candidates: a few percent lower error), the super-block's float16 scales (d, dmin) from the largest sub-block
values, and sub-scales rounded to 6 bits (Q6_K: 8 signed bits). Codes are then chosen against the effective float16
steps the decoder will use, so the rounding the decoder adds is already accounted for. The bytes follow GGML's block
layouts exactly (checked by decoding them with the gguf package).
"""

from __future__ import annotations

import torch

from .dequant import GGML_BY_NAME

QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero (numpy's np_roundf in the gguf package), in float32."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _half_bytes(values: torch.Tensor) -> torch.Tensor:
    """(n,) float -> (n, 2) uint8: the float16 bytes, little-endian."""
    return values.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def _safe_reciprocal(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    codes = _round_away(blocks * _safe_reciprocal(d)).to(torch.int8)
    return torch.cat([_half_bytes(d.view(-1)), codes.view(torch.uint8)], dim=1)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    extreme = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))  # signed value of largest magnitude
    d = extreme / -8
    codes = torch.trunc(blocks * _safe_reciprocal(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_half_bytes(d.view(-1)), codes[:, :16] | (codes[:, 16:] << 4)], dim=1)


def _fit_affine(x: torch.Tensor, levels: int, rounds: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x (..., 32): scale >= 0 and min >= 0 with x ~= scale * q - min, q in [0, levels]."""
    low = x.amin(dim=-1, keepdim=True).clamp(max=0)
    scale = (x.amax(dim=-1, keepdim=True) - low) / levels
    minimum = -low
    for _ in range(rounds):  # least squares of x = scale * q - min over the codes chosen so far
        q = torch.round((x + minimum) * _safe_reciprocal(scale)).clamp(0, levels)
        count, sum_q, sum_x = x.shape[-1], q.sum(-1, keepdim=True), x.sum(-1, keepdim=True)
        sum_qq, sum_qx = (q * q).sum(-1, keepdim=True), (q * x).sum(-1, keepdim=True)
        det = count * sum_qq - sum_q * sum_q
        fitted_scale = (count * sum_qx - sum_q * sum_x) / torch.where(det == 0, torch.ones_like(det), det)
        fitted_min = (sum_q * fitted_scale - sum_x) / count
        good = (det > 0) & (fitted_scale > 0) & (fitted_min >= 0)
        scale, minimum = torch.where(good, fitted_scale, scale), torch.where(good, fitted_min, minimum)
    return scale, minimum


def _six_bit(values: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-block values (n, 8) >= 0 -> (float16-rounded super scale (n, 1), 6-bit codes (n, 8))."""
    d = (top / 63).to(torch.float16).float()
    return d, torch.round(values * _safe_reciprocal(d)).clamp(0, 63)


def _pack_k_scales(scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins (n, 8) -> GGML's 12-byte layout."""
    scale, minimum = scale.to(torch.uint8), minimum.to(torch.uint8)
    first = scale[:, :4] | ((scale[:, 4:] >> 4) << 6)
    second = minimum[:, :4] | ((minimum[:, 4:] >> 4) << 6)
    third = (scale[:, 4:] & 15) | ((minimum[:, 4:] & 15) << 4)
    return torch.cat([first, second, third], dim=1)


def _k_affine(blocks: torch.Tensor, levels: int):
    """Q4_K / Q5_K: (n, 256) -> (d, dmin, 6-bit scales, 6-bit mins, codes (n, 8, 32))."""
    x = blocks.view(-1, 8, 32)
    scale, minimum = _fit_affine(x, levels)
    scale, minimum = scale.squeeze(-1), minimum.squeeze(-1)
    d, scale_codes = _six_bit(scale, scale.amax(dim=1, keepdim=True))
    dmin, min_codes = _six_bit(minimum, minimum.amax(dim=1, keepdim=True))
    # The decoder's steps, rounded to float16 as it rounds them.
    step = (d * scale_codes).to(torch.float16).float().unsqueeze(-1)
    offset = (dmin * min_codes).to(torch.float16).float().unsqueeze(-1)
    codes = torch.round((x + offset) * _safe_reciprocal(step)).clamp(0, levels).to(torch.uint8)
    return d, dmin, scale_codes, min_codes, codes


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, scale_codes, min_codes, codes = _k_affine(blocks, 15)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(-1, 128)  # sub-blocks 2c (low) and 2c + 1 (high)
    return torch.cat([_half_bytes(d.view(-1)), _half_bytes(dmin.view(-1)), _pack_k_scales(scale_codes, min_codes),
                      packed], dim=1)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, scale_codes, min_codes, codes = _k_affine(blocks, 31)
    low = codes & 15
    packed = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)
    shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).view(1, 8, 1)
    high = ((codes >> 4) << shifts).sum(dim=1, dtype=torch.uint8)  # bit s of byte l: code l of sub-block s
    return torch.cat([_half_bytes(d.view(-1)), _half_bytes(dmin.view(-1)), _pack_k_scales(scale_codes, min_codes),
                      high, packed], dim=1)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    x = blocks.view(n, 16, 16)
    extreme = x.gather(2, x.abs().argmax(dim=2, keepdim=True)).squeeze(-1)  # (n, 16) signed
    scale = extreme / -32  # the extreme value lands on code -32
    top = scale.gather(1, scale.abs().argmax(dim=1, keepdim=True))
    d = (top / -128).to(torch.float16).float()
    scale_codes = torch.round(scale * _safe_reciprocal(d)).clamp(-128, 127)
    step = (d * scale_codes).to(torch.float16).float().unsqueeze(-1)
    codes = (torch.round(x * _safe_reciprocal(step)).clamp(-32, 31) + 32).to(torch.uint8).view(n, 2, 128)
    low, high = codes & 15, codes >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(n, 128)
    qh = (high[:, :, 0:32] | (high[:, :, 32:64] << 2) | (high[:, :, 64:96] << 4) | (high[:, :, 96:] << 6))
    return torch.cat([ql, qh.reshape(n, 64), scale_codes.to(torch.int8).view(torch.uint8), _half_bytes(d.view(-1))],
                     dim=1)


_QUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize_gguf(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """(..., K) float weight -> (..., K / block * block bytes) uint8 GGML blocks of `qtype` (computed in float32).

    K must be a whole number of blocks (32 for Q8_0 / Q4_0, 256 for the K-quants)."""
    kind = GGML_BY_NAME[qtype]
    if weight.shape[-1] % kind.block:
        raise ValueError(f"{qtype} needs rows of a multiple of {kind.block} values, got {weight.shape[-1]}")
    blocks = weight.detach().float().reshape(-1, kind.block)
    return _QUANTIZERS[qtype](blocks).reshape(*weight.shape[:-1], -1)
