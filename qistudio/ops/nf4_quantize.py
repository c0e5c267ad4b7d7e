"""Quantising float weights to bitsandbytes' 4-bit format (NF4 / FP4) in torch, on any device.

The same operations as bitsandbytes' quantize_4bit (its reference implementation, which its CPU build runs): over
the flattened weight, a float32 absmax per block, values times 1 / absmax clamped to [-1, 1], the nearest code
book entry found against the midpoints between sorted entries (ties to the upper one), two codes per byte with the
first in the high nibble. The bytes equal bitsandbytes' (tests/test_gguf_quantize.py), and bitsandbytes is not
needed to write them.
"""

from __future__ import annotations

import torch

from .dequant import code_book


def quantize_4bit(weight: torch.Tensor, qtype: str = "NF4", blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight -> (packed codes (ceil(n / 2), 1) uint8, absmax (ceil(n / blocksize),) float32)."""
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if n % blocksize:
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    code = code_book(qtype, flat.device)
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    codes = order[torch.bucketize(scaled, midpoints, out_int32=True)].to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.unsqueeze(1), absmax
