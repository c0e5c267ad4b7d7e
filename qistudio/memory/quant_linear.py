"""Quantised weight storage: a Linear that keeps its weight as a GGUF / bitsandbytes file holds it and dequantises it
for each use, computing in the activations' dtype.

Design note. Storage is the file's own bytes, never re-encoded: `weight` is a GGUF tensor's blocks (uint8, one row
of blocks per output feature: (out, in / block * block bytes)), bitsandbytes' packed 4-bit codes (uint8, (out * in
/ 2, 1)) with `weight_absmax` (and, nested, `weight_nested_absmax` + `weight_nested_code`) and the code book
`weight_code`, or bitsandbytes' int8 rows with `weight_scb`. They are parameters (the offloaders stream parameters,
state dicts show them) that never train; `bias` stays in the compute dtype. The format's arithmetic lives in
ops/dequant.py (diffusers' / bitsandbytes' roundings, bit for bit) and, on CUDA, ops/dequant_triton.py.

Compute: on the CPU (and for types without a kernel) the weight is dequantised to the input's dtype and a plain
F.linear runs, so this layer's output is bit for bit that of nn.Linear on `dequantized_weight()`: what diffusers'
GGUFLinear computes. On CUDA a Triton kernel decodes the blocks: for a few rows (the modulation linears, fed one
timestep embedding) inside the matmul, reading the quantised bytes once; for many rows (the image tokens) into a
dense weight that cuBLAS multiplies (the decode is a pass over the small quantised weight plus one write of the
dense one, against a GEMM thousands of rows deep: a few percent).

LoRA: `weight_shape` is the real (out, in), what a LoRA's delta is checked against; an unfused LoRA's hook adds
its output as on any linear. Fusing is refused (the delta cannot be added into 4 bits without losing it).

`.to(dtype)`, `.half()`, `.bfloat16()`, `.float()` move this layer but never cast the stored tensors: they set the
compute dtype (and the bias's dtype), as FP8Linear does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import dequant
from ..ops.dequant_triton import quantized_linear_cuda, supports_cuda

# The stored tensors of each family, beyond `weight` (parameters of these names).
_PARTS = {"gguf": (), "4bit": ("weight_absmax", "weight_code", "weight_nested_absmax", "weight_nested_code"),
          "int8": ("weight_scb",)}


def family(qtype: str) -> str:
    if qtype in dequant.CODE_BOOKS:
        return "4bit"
    if qtype == "INT8":
        return "int8"
    if qtype in dequant.KEPT_QUANTIZED:
        return "gguf"
    raise ValueError(f"quantised type {qtype!r} is not one a layer keeps; types: "
                     f"{', '.join((*dequant.KEPT_QUANTIZED, *dequant.CODE_BOOKS, 'INT8'))}")


class QuantizedLinear(nn.Module):
    """y = x @ W^T + bias with W stored quantised (GGUF blocks, bitsandbytes 4-bit or int8) and decoded per use.

    Keeps nn.Linear's interface (in_features, out_features, weight, bias) for LoRA hooks, offload and state dicts;
    `weight` holds the stored bytes, `weight_shape` the real (out, in).
    """

    def __init__(self, in_features: int, out_features: int, qtype: str, tensors: dict[str, torch.Tensor],
                 bias: bool = True, compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 0,
                 nested_offset: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.family = qtype, family(qtype)
        self.compute_dtype = compute_dtype
        self.blocksize, self.nested_offset = blocksize, nested_offset
        unknown = set(tensors) - {"weight", *_PARTS[self.family]}
        if "weight" not in tensors or unknown:
            raise ValueError(f"a {qtype} QuantizedLinear takes weight and {_PARTS[self.family]}, got {sorted(tensors)}")
        for name, tensor in tensors.items():
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        device = tensors["weight"].device
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _absmax(self) -> torch.Tensor:
        return dequant.absmax_4bit(self.weight_absmax, getattr(self, "weight_nested_absmax", None),
                                   getattr(self, "weight_nested_code", None), self.nested_offset)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the forward multiplies by, (out, in) in `dtype` (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        if self.family == "gguf":
            return dequant.dequantize_gguf(self.weight, self.quant_type, self.weight_shape, dtype)
        if self.family == "4bit":
            return dequant.dequantize_4bit(self.weight, self._absmax(), self.weight_code, self.weight_shape,
                                           self.blocksize, dtype)
        return dequant.dequantize_int8(self.weight, self.weight_scb, dtype)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        bias = self.bias
        return bias.to(dtype) if bias is not None and bias.dtype != dtype else bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._bias(x.dtype)
        if x.is_cuda and not x.requires_grad and supports_cuda(self, x):
            return quantized_linear_cuda(self, x, bias)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        # nn.Module.to/half/float/cuda pass every floating tensor through fn: the stored tensors (float32 absmaxes and
        # code books included) only move; the compute dtype follows fn as the bias would.
        def keep_storage(tensor):
            if tensor is not self.bias:
                target = fn(tensor.new_empty(0))
                if target.dtype != tensor.dtype:
                    return tensor.to(target.device)
            return fn(tensor)

        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype, device=self.weight.device)).dtype
        return super()._apply(keep_storage, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"storage={self.quant_type}, compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")


def quantized_linears(model: nn.Module) -> list[QuantizedLinear]:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]
