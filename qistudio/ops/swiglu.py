"""SwiGLU's product and its per-token FP8 quantisation in one pass: the input of a W8A8 down projection.

Why: under FP8 compute (W8A8) the SwiGLU MLP's output projection (Qwen-Image 2.1's `img_mlp.out`) takes
silu(gate) * proj quantised per token. Left to inductor, the product is one kernel and the quantisation a looped
row reduction that reads the (tokens, 12288) product again, as it did for the 20B model's GELU (ops/fp8_kernels.py
`gelu_quantize_rows`, measured there: 0.46 ms of a 6.5 ms block). One program per row reads gate and proj once and
writes the float8 row and its scale: the floor of this work.

Reference form (`swiglu_quantize_rows_reference`; any device, differentiable): eager's roundings, the SiLU and the
product each rounded to the inputs' dtype, then `quantize_rows`. The kernel does the same arithmetic in float32
with the same two roundings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import FP8_DTYPE, quantize_rows
from .fused import triton_inference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference form serves
    triton = None


def swiglu_quantize_rows_reference(gate: torch.Tensor, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(F.silu(gate) * proj)


def swiglu_quantize_rows(gate: torch.Tensor, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, K) gate and proj pre-activations -> quantize_rows(silu(gate) * proj): (T, K) float8_e4m3fn and (T, 1)
    float32 scales. One Triton pass on CUDA when no gradient is needed."""
    if (triton_inference(gate, proj) and gate.dtype == proj.dtype and gate.dtype in (torch.bfloat16, torch.float16)
            and gate.shape == proj.shape and gate.dim() == 2):
        return torch.ops.qistudio.swiglu_quantize_rows(gate, proj)
    return swiglu_quantize_rows_reference(gate, proj)


if triton is not None:

    @triton.jit
    def _swiglu_quantize_rows_kernel(gate_ptr, proj_ptr, q_ptr, scale_ptr, cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        mask = offsets < cols
        gate = tl.load(gate_ptr + row * cols + offsets, mask=mask, other=0.0).to(tl.float32)
        proj = tl.load(proj_ptr + row * cols + offsets, mask=mask, other=0.0).to(tl.float32)
        dtype = gate_ptr.dtype.element_ty
        # SiLU as PyTorch computes it (x / (1 + exp(-x)) in float32), rounded; the product rounded again.
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        product = (silu * proj).to(dtype).to(tl.float32)
        amax = tl.maximum(tl.max(tl.where(mask, tl.abs(product), 0.0), axis=0), 1e-12)
        tl.store(q_ptr + row * cols + offsets, (product * (448.0 / amax)).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, amax / 448.0)

    @torch.library.triton_op("qistudio::swiglu_quantize_rows", mutates_args=())
    def _swiglu_quantize_rows(gate: torch.Tensor, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, proj = gate.contiguous(), proj.contiguous()
        rows, cols = gate.shape
        quantized = torch.empty(rows, cols, dtype=FP8_DTYPE, device=gate.device)
        scale = torch.empty(rows, 1, dtype=torch.float32, device=gate.device)
        block = triton.next_power_of_2(cols)
        # One row per program, held whole in registers (12288 -> 16384 columns for the released model): the
        # launch of gelu_quantize_rows, which moves this kind of row at memory speed.
        torch.library.wrap_triton(_swiglu_quantize_rows_kernel)[(rows,)](
            gate, proj, quantized, scale, cols, BLOCK=block, num_warps=min(32, max(4, block // 512)))
        return quantized, scale
