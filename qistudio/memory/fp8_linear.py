"""FP8 weight storage: a Linear that keeps its weight in float8_e4m3fn and computes in the activations' dtype.

Design note. Storage: `weight` (out, in) float8_e4m3fn and `weight_scale` (out,) float32, one scale per output
channel, so W ~= weight * weight_scale[:, None]; `bias` stays in the compute dtype. That halves a bf16 model's
linear weights (the DiT's 40 GB to 20 GB) at the cost of e4m3's 3 mantissa bits: every weight is rounded to within
2^-4 of itself (subnormals: within 2^-10 of its channel's scale), about 2.6% relative L2 on Gaussian weights.

Scales are powers of two: the smallest with absmax / scale <= 448 (e4m3's largest value). Against the textbook
absmax / 448 this costs nothing measurable (relative L2 2.65% either way on a 3072x3072 Gaussian weight; e4m3's
relative spacing is the same in every binade) and buys exactness: fp8 value * 2^k is representable in bf16, fp16
and fp32, so the dequantised weight carries no rounding beyond the quantisation itself, this layer's output is bit
for bit that of an nn.Linear holding `dequantized_weight()`, and so is a model dequantised from such a file on load.
Scales from other tools (any float32) work too; they are rounded to the compute dtype.

Compute ("upcast"): the weight is dequantised to the input's dtype inside forward and a plain F.linear runs. The
scale is applied to the weight, not to the output, because (1) the result then equals nn.Linear on the dequantised
weight exactly, with the bias add fused in the matmul (scaling the output adds a bf16 rounding: 2.8e-3 apart);
(2) it is the cheaper pass where the time goes: measured on an H100 (bf16, 14178 tokens = 1328x1328 with guidance),
the image stream's layers take 1.11-1.26x the bf16 layer's time eager (output scaling: 1.16-1.41x) and 0.98-1.03x
under torch.compile, which fuses the cast and the multiply. Layers fed a few tokens (the modulation linears, the text
encoder) are bound by reading the weight: the upcast copy makes them 3-9x a bf16 layer there (tens to hundreds of
microseconds); a kernel that reads the float8 weight directly is the fix, not a different formulation.
FP8 compute (W8A8, issue 7) plugs in at `forward`: `weight` row-major (out, in) is the column-major (in, out)
operand torch._scaled_mm takes as `weight.t()`, and `weight_scale` is its float32 row-wise scale (as (1, out)).

Training (a LoRA over a frozen FP8 base): when the input needs a gradient, the forward runs through
`_UpcastLinear`, which saves the float8 weight and its scales (aliases of the parameters, no copy) instead of
the dequantised one that F.linear's autograd would keep, and dequantises again in the backward for
grad_input = grad_output @ W. The forward's result is the same bits either way.

`.to(dtype)`, `.half()`, `.bfloat16()`, `.float()` move this layer but never cast its weight or scales: they set
the compute dtype (and the bias's dtype). The stored bytes only change through `quantize_weight`.
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.packed_linears import release_packed
from ..ops.fp8 import FP8_DTYPE, FP8_MAX, quantize_rows
from ..ops.fp8_kernels import GEMV_MAX_ROWS, fp8_weight_gemv, gelu_quantize_rows
from ..ops.swiglu import swiglu_quantize_rows

Predicate = Callable[[str, nn.Linear], bool]


# --- stateless quantise / dequantise (ops/fp8.py material once that file exists) ------------------------------------


@functools.cache
def _warn_fp8_fallback(rows_shape, weight_shape) -> None:
    warnings.warn(f"cuBLASLt has no FP8 matmul for activations {tuple(rows_shape)} x weight {tuple(weight_shape)}; "
                  "that product runs on dequantised bf16 operands", RuntimeWarning, stacklevel=3)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (out, in) float8_e4m3fn and (out,) float32 power-of-two scales, computed in float32.

    A zero row gets scale 1 (frexp(0) has exponent 0), so nothing ever divides by zero.
    """
    weight = weight.detach().float()
    absmax = weight.abs().amax(dim=1)
    if not torch.isfinite(absmax).all():
        raise ValueError("cannot quantise a weight holding inf or NaN to FP8")
    # absmax / 448 = m * 2^e with m in [0.5, 1), so 2^e is the smallest power of two >= it (twice it at exact powers).
    _, exponent = torch.frexp(absmax / FP8_MAX)
    scale = torch.ldexp(torch.ones_like(absmax), exponent)
    # Dividing by a power of two is exact; the clamp only guards the cast (e4m3fn has no inf).
    quantized = (weight / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight * scale[:, None] in `dtype`; exact for power-of-two scales (one rounding of the scale otherwise)."""
    # float8 does not promote with other dtypes: cast first, then scale the fresh copy in place (no second buffer).
    return weight.to(dtype).mul_(scale.to(dtype)[:, None])


def _dequantize_fused(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype) * scale.to(dtype)[:, None]


# On a GPU the cast and the multiply become one pass over the weight (eager runs two and writes the bf16 copy twice):
# measured on an H100, the FP8 layer then costs 0.98-1.03x a bf16 one instead of 1.1-1.26x. One compile per weight
# shape (a handful in the DiT); the result is bit-identical to the eager path (power-of-two scales are exact).
_dequantize_compiled = torch.compile(_dequantize_fused, dynamic=False)


# One fused pass (abs-max, scale, cast) per call; token counts vary, so the shape is dynamic.
_quantize_rows_compiled = torch.compile(quantize_rows, dynamic=True)


def _dequantize_for(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight in x's dtype: traced into the surrounding graph when compiling, one fused pass on a GPU."""
    if torch.compiler.is_compiling():
        return _dequantize_fused(weight, scale, x.dtype)
    if x.is_cuda:
        return _dequantize_compiled(weight, scale, x.dtype)
    return dequantize_weight(weight, scale, x.dtype)


def _dequantize_in_training(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """As _dequantize_for, but plain eager ops outside a compiled region. A training step dequantises each weight
    three times (forward, checkpoint recompute, backward) at a few thousand tokens, where the compiled function's
    host-side call cost (~0.4 ms) made the step host-bound: 2.3 s instead of 1.2 s per 1024x1024 LoRA step on an
    H100 (bench/train_step.py). Same bits either way (power-of-two scales)."""
    if torch.compiler.is_compiling():
        return _dequantize_fused(weight, scale, x.dtype)
    return dequantize_weight(weight, scale, x.dtype)


class _UpcastLinear(torch.autograd.Function):
    """F.linear over the dequantised weight that keeps only the float8 weight for its backward.

    The weight never trains (float8 has no gradient); the input and the bias may.
    """

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        # Aliases of the bytes this forward read: a streamed block's parameters are re-pointed between uses, and the
        # backward must see what the forward saw (the block stays on its device slot until its backward is done).
        ctx.save_for_backward(weight.detach(), scale.detach())
        return F.linear(x, _dequantize_in_training(x, weight, scale), bias)

    @staticmethod
    def backward(ctx, grad_output):
        weight, scale = ctx.saved_tensors
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _dequantize_in_training(grad_output, weight, scale)
            grad_input = grad_output.matmul(weight)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_input, None, None, grad_bias


# --- the layer ----------------------------------------------------------------------------------------------------


class FP8Linear(nn.Module):
    """y = x @ (weight * weight_scale[:, None])^T + bias, with the weight stored in float8_e4m3fn.

    Keeps nn.Linear's interface (in_features, out_features, weight (out, in), bias), so LoRA hooks, offload and
    state dicts treat it as a linear; its state dict adds `weight_scale` beside `weight`.
    """

    # W8A8 matmuls use cuBLAS's fast accumulation on Hopper (partial sums stay in the tensor cores' accumulator
    # instead of being promoted to float32 every few steps): the FP8 DiT forward 1.11x faster (0.335 -> 0.303 s,
    # H100, 1328x1328, batch 2) at the same 1.34% error against bf16, the activations' quantisation dominating.
    # set_fp8_compute(..., fast_accumulation=False) promotes instead.
    fast_accumulation = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        # Parameters, not buffers: they are the model's weights (the loader matches and offload streams parameters);
        # never trained (float8 has no gradient), so requires_grad is off.
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> "FP8Linear":
        """Quantise an nn.Linear of any float dtype; compute_dtype defaults to its weight's dtype.

        A linear on the meta device gives an FP8Linear on the meta device (to be filled by a loader).
        """
        weight = linear.weight
        compute_dtype = compute_dtype or weight.dtype
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype,
                    device=weight.device)
        if weight.device.type != "meta":
            quantized, scale = quantize_weight(weight)
            layer.weight.data, layer.weight_scale.data = quantized, scale
            if linear.bias is not None:
                layer.bias.data = linear.bias.detach().to(compute_dtype).clone()
        if linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer.train(linear.training)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the forward multiplies by, (out, in) in `dtype` (default: the compute dtype)."""
        return dequantize_weight(self.weight, self.weight_scale, dtype or self.compute_dtype)

    # W8A8 (issue 7, `enable_dit_fp8_computation`): activations quantised per token, one FP8 matmul with both
    # scales applied in its epilogue. Off by default: it adds the activations' rounding to the weights'.
    fp8_compute = False

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        bias = self.bias
        return bias.to(dtype) if bias is not None and bias.dtype != dtype else bias

    def _uses_w8a8(self, x: torch.Tensor) -> bool:
        return self.fp8_compute and x.is_cuda and x.shape[:-1].numel() > GEMV_MAX_ROWS

    def _scaled_mm(self, rows: torch.Tensor, scale: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: inductor picks the kernel, and a try block would break the graph
            out = self._fp8_matmul(rows, scale, dtype)
        else:
            try:
                out = self._fp8_matmul(rows, scale, dtype)
            except RuntimeError as error:
                # cuBLASLt has no FP8 algorithm for some row counts with row-wise scales (seen on an H200 with
                # torch 2.11 for a short text batch: CUBLAS_STATUS_NOT_SUPPORTED from its heuristic). The same
                # product from the dequantised operands is the result the FP8 matmul approximates.
                if "NOT_SUPPORTED" not in str(error):
                    raise
                _warn_fp8_fallback(rows.shape, self.weight.shape)
                activations = (rows.to(torch.float32) * scale).to(dtype)
                out = F.linear(activations, self.dequantized_weight(dtype), self._bias(dtype))
        return out.reshape(*shape[:-1], self.out_features)

    def _fp8_matmul(self, rows: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch._scaled_mm(rows, self.weight.t(), scale_a=scale, scale_b=self.weight_scale[None, :],
                                bias=self._bias(dtype), out_dtype=dtype, use_fast_accum=self.fast_accumulation)

    def forward_after_gelu(self, hidden: torch.Tensor) -> torch.Tensor:
        """self(GELU_tanh(hidden)); under W8A8 the GELU and the activations' quantisation are one pass."""
        if self._uses_w8a8(hidden) and not self._forward_hooks and not self._forward_pre_hooks:
            rows, scale = gelu_quantize_rows(hidden.reshape(-1, self.in_features))
            return self._scaled_mm(rows, scale, hidden.shape, hidden.dtype)
        return self(F.gelu(hidden, approximate="tanh"))

    def forward_after_swiglu(self, gate: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        """self(silu(gate) * proj) (a SwiGLU MLP's output, Qwen-Image 2.1); under W8A8 the product and the
        activations' quantisation are one pass."""
        if self._uses_w8a8(gate) and not self._forward_hooks and not self._forward_pre_hooks:
            rows, scale = swiglu_quantize_rows(gate.reshape(-1, self.in_features), proj.reshape(-1, self.in_features))
            return self._scaled_mm(rows, scale, gate.shape, gate.dtype)
        return self(F.silu(gate) * proj)

    def forward_fp8_input(self, x8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """self(x8 * descale) for a float8 input with one descale (FP8 attention's output); W8A8 takes it as is."""
        if self._uses_w8a8(x8) and not self._forward_hooks and not self._forward_pre_hooks:
            rows = x8.reshape(-1, self.in_features)  # a copy when x8 is a strided slice
            scale = descale.reshape(1, 1).expand(rows.shape[0], 1).contiguous()
            return self._scaled_mm(rows, scale, x8.shape, dtype)
        return self((x8.float() * descale.reshape(())).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._bias(x.dtype)
        if self._uses_w8a8(x):
            # Inside a compiled region (regional compile of the DiT block) the plain function is traced and fused
            # with its neighbours; outside, its own compiled version gives one fused pass.
            quantize = quantize_rows if torch.compiler.is_compiling() else _quantize_rows_compiled
            rows, scale = quantize(x.reshape(-1, self.in_features))
            return self._scaled_mm(rows, scale, x.shape, x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _UpcastLinear.apply(x, self.weight, self.weight_scale, bias)
        if x.is_cuda and x.shape[:-1].numel() <= GEMV_MAX_ROWS:
            # A few rows (the modulation linears): read the float8 weight once instead of dequantising it.
            return fp8_weight_gemv(x, self.weight, self.weight_scale, bias)
        return F.linear(x, _dequantize_for(x, self.weight, self.weight_scale), bias)

    def _apply(self, fn, recurse=True):
        # nn.Module.to/half/bfloat16/float/cuda pass every floating tensor (float8 included) through fn. Learn on an
        # empty tensor what fn would do to the weight and the scales; where it would change their dtype, only move
        # them. The compute dtype follows fn as the bias (or an nn.Linear's weight) would.
        def keep_storage(tensor):
            if tensor is self.weight or tensor is self.weight_scale:
                target = fn(tensor.new_empty(0))
                if target.dtype != tensor.dtype:
                    return tensor.to(target.device)
            return fn(tensor)

        self.compute_dtype = fn(self.weight.new_empty(0, dtype=self.compute_dtype)).dtype
        return super()._apply(keep_storage, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"storage={str(self.weight.dtype).removeprefix('torch.')}, "
                f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")


# --- which linears, and the in-place transform ----------------------------------------------------------------------


def dit_fp8_predicate(name: str, module: nn.Linear) -> bool:
    """The DiT's block linears (attention, MLPs, modulation: ~all of its weights). The top-level ones (img_in,
    txt_in, time_text_embed, norm_out.linear, proj_out) stay in the compute dtype: small, and they touch every
    token's input or the final output directly."""
    return name.startswith("transformer_blocks.")


_LANGUAGE_LAYER = re.compile(r"(^|\.)language_model\.layers\.\d+\.")


def text_encoder_fp8_predicate(name: str, module: nn.Linear) -> bool:
    """Qwen2.5-VL's decoder-layer linears (`*.language_model.layers.N.*`); the vision tower and embeddings stay."""
    return _LANGUAGE_LAYER.search(name) is not None


def set_fp8_compute(model: nn.Module, enabled: bool = True, fast_accumulation: bool | None = None) -> int:
    """Switch W8A8 compute on (or off) for every FP8Linear of `model`, and optionally its fast accumulation;
    returns how many."""
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    for layer in layers:
        layer.fp8_compute = enabled
        if fast_accumulation is not None:
            layer.fast_accumulation = fast_accumulation
    return len(layers)


def quantize_linears(model: nn.Module, predicate: Predicate | None = None,
                     compute_dtype: torch.dtype | None = None) -> int:
    """Replace, in place, every nn.Linear for which predicate(name, module) holds by an FP8Linear of the same name.

    predicate defaults to `dit_fp8_predicate`; pass `text_encoder_fp8_predicate` for the text encoder. compute_dtype
    defaults to each linear's dtype. Returns how many were replaced (0 when called again: FP8Linear is not an
    nn.Linear). Quantise before loading LoRAs or attaching offload: a replaced module's hooks would be lost, so a
    linear carrying any raises instead.
    """
    predicate = predicate or dit_fp8_predicate
    release_packed(model)  # the packed text q/k/v would keep the replaced bf16 weights alive
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and predicate(name, module)]
    hooked = [name for name, module in chosen if module._forward_hooks or module._forward_pre_hooks]
    if hooked:
        raise ValueError(f"{len(hooked)} linears to quantise carry hooks (a LoRA, offload?), first: {hooked[0]}; "
                         "quantise to FP8 first, then load LoRAs and set up offloading")
    if not chosen and not any(isinstance(m, FP8Linear) for m in model.modules()):
        raise ValueError(f"no linear of this {type(model).__name__} matches the FP8 predicate "
                         "(dit_fp8_predicate is the default; text_encoder_fp8_predicate is for the text encoder)")
    for name, module in chosen:
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, FP8Linear.from_linear(module, compute_dtype))
    return len(chosen)
