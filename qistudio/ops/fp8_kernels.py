"""Triton kernels of the FP8 paths where torch.compile's own code falls short (measured on an H100).

- `gelu_quantize_rows`: GELU(tanh) of an MLP's hidden activations and their per-token FP8 quantisation in one
  pass. Compiled, the same work is a looped reduction that reads the (tokens, 12288) hidden tensor twice: 0.46 ms
  of a 6.5 ms FP8 block at 1328x1328, batch 2; one read and one float8 write is the floor.
- `fp8_weight_gemv`: y = x @ (W * s)^T + b for a handful of rows (the modulation linears, fed the timestep
  embedding) reading the float8 weight directly. Dequantising first writes and re-reads a bf16 copy of a 56M-entry
  weight: 0.2 ms per block for the two modulation linears, against about 0.04 ms to read 2 x 56 MB once.

Each has a reference form with the same arithmetic (used on CPU, under autograd, or without Triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import FP8_DTYPE, quantize_rows


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def gelu_quantize_rows(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, K) pre-activation -> quantize_rows(GELU_tanh(hidden)), the GELU rounded to hidden's dtype first."""
    if triton is not None and hidden.is_cuda and not hidden.requires_grad:
        return torch.ops.qistudio.gelu_quantize_rows(hidden)
    return quantize_rows(F.gelu(hidden, approximate="tanh"))


def fp8_weight_gemv_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                              bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight.to(x.dtype) * scale.to(x.dtype)[:, None], bias)


GEMV_MAX_ROWS = 16


def fp8_weight_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) with at most 16 rows, weight (N, K) float8, scale (N,) -> (..., N) in x's dtype."""
    rows = x.shape[:-1].numel()
    if (triton is not None and x.is_cuda and rows <= GEMV_MAX_ROWS and not x.requires_grad
            and x.dtype in (torch.bfloat16, torch.float16)):
        out = torch.ops.qistudio.fp8_weight_gemv(x.reshape(rows, -1), weight, scale, bias)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return fp8_weight_gemv_reference(x, weight, scale, bias)


if triton is not None:

    @triton.jit
    def _gelu_quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offsets = tl.arange(0, BLOCK)
        mask = offsets < cols
        x = tl.load(x_ptr + row * cols + offsets, mask=mask, other=0.0).to(tl.float32)
        # GELU(tanh) in float32, rounded to the activations' dtype: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), with a
        # fast division (a few ulp of float32, far below the bf16 rounding). Few instructions per element: at the
        # clocks of a power-limited GPU an exact division per element made this pass compute-bound.
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        gelu = tl.fdiv(x, 1.0 + tl.exp(-2.0 * inner)).to(x_ptr.dtype.element_ty).to(tl.float32)
        amax = tl.maximum(tl.max(tl.where(mask, tl.abs(gelu), 0.0), axis=0), 1e-12)
        tl.store(q_ptr + row * cols + offsets, (gelu * (448.0 / amax)).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, amax / 448.0)

    @torch.library.triton_op("qistudio::gelu_quantize_rows", mutates_args=())
    def _gelu_quantize_rows(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden.contiguous()
        rows, cols = hidden.shape
        quantized = torch.empty(rows, cols, dtype=FP8_DTYPE, device=hidden.device)
        scale = torch.empty(rows, 1, dtype=torch.float32, device=hidden.device)
        block = triton.next_power_of_2(cols)
        torch.library.wrap_triton(_gelu_quantize_rows_kernel)[(rows,)](
            hidden, quantized, scale, cols, BLOCK=block, num_warps=min(32, max(4, block // 512)))
        return quantized, scale

    @triton.jit
    def _fp8_weight_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, rows, n, k,
                                HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        cols_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ids = tl.arange(0, ROWS)
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row_ids[:, None] * k + ks[None, :],
                        mask=(row_ids[:, None] < rows) & (ks[None, :] < k), other=0.0)
            w = tl.load(w_ptr + cols_n[:, None] * k + ks[None, :],
                        mask=(cols_n[:, None] < n) & (ks[None, :] < k), other=0.0)
            # float8 -> the activations' dtype is exact; the per-channel scale is applied once at the end.
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        acc = acc * tl.load(scale_ptr + cols_n, mask=cols_n < n, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols_n, mask=cols_n < n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + row_ids[:, None] * n + cols_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(row_ids[:, None] < rows) & (cols_n[None, :] < n))

    @torch.library.triton_op("qistudio::fp8_weight_gemv", mutates_args=())
    def _fp8_weight_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()
        rows, k = x.shape
        n = weight.shape[0]
        out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
        block_n = 16  # many small programs: the weight read is the whole cost, spread it over every SM
        has_bias = bias is not None
        torch.library.wrap_triton(_fp8_weight_gemv_kernel)[(triton.cdiv(n, block_n),)](
            x, weight, scale, bias.to(x.dtype) if has_bias else scale, out, rows, n, k,
            HAS_BIAS=has_bias, ROWS=GEMV_MAX_ROWS, BLOCK_N=block_n, BLOCK_K=512, num_warps=4, num_stages=3)
        return out
