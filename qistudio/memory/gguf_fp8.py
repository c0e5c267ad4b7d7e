"""FP8 compute from GGUF Q8_0 files: the Q8_0 linears of a loaded model converted to FP8Linear (float8_e4m3fn weights,
per-channel power-of-two scales), where the GPU computes in FP8.

Design note. A Q8_0 block holds 32 int8 codes q in [-127, 127] and one float16 scale d: w = d * q. FP8Linear holds
e4m3 values (4 significant bits) times one power-of-two scale per output row. The conversion is NOT exact, and
cannot be: one e4m3 value cannot carry a 7-bit code (|q| = 127 needs 7 significant bits), and the blocks of one row
have different scales d that no single per-row scale turns into e4m3 values. What it is, exactly, is one rounding:
d * q is computed in float32, where it is exact (11 significant bits of d times at most 7 of q: 18 < 24), then
`quantize_weight` divides by a power of two (exact) and rounds to the nearest e4m3 value. So the FP8 weight is bit
for bit quantize_weight(the file's exact weights), and its error is FP8's own: within 2^-4 of each weight
(relative), or 2^-10 of its row's scale for values in e4m3's subnormal range. Dequantising first the way diffusers
does (float16 arithmetic: d * q rounded to float16) and then quantising to FP8 rounds twice; it agrees except where
the float16 rounding moves a value across an e4m3 rounding boundary (then one e4m3 step apart).

Why convert at all: W8A8 FP8 GEMMs (FP8Linear.fp8_compute) run at twice the bf16 tensor-core rate on Hopper and Ada;
the Q8_0 kernels dequantise to bf16 for cuBLAS. Storage is the same one byte per weight (Q8_0: 34 bytes per 32
weights; FP8: 32 bytes plus a float32 per row). Where the GPU has no FP8 (before compute capability 8.9), or no FP8
compute was asked for, Q8_0 layers stay as they are: the conversion only costs precision there.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.dequant import q8_0_float32
from .fp8_linear import FP8Linear, quantize_weight
from .quant_linear import QuantizedLinear

FP8_CAPABILITY = (8, 9)  # Ada and newer: float8 tensor cores (torch._scaled_mm)


def device_computes_fp8(device=None) -> bool:
    """Whether `device` (default: the current CUDA device) has FP8 tensor cores."""
    if not torch.cuda.is_available():
        return False
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY


def fp8_from_q8_0(layer: QuantizedLinear) -> FP8Linear:
    """A Q8_0 QuantizedLinear as an FP8Linear on the same device (see the design note for what is rounded)."""
    if layer.quant_type != "Q8_0":
        raise ValueError(f"only Q8_0 converts to FP8 (one rounding of int8 codes); this layer is {layer.quant_type}")
    fp8 = FP8Linear(layer.in_features, layer.out_features, layer.bias is not None, layer.compute_dtype,
                    device="meta")
    weight, scale = quantize_weight(q8_0_float32(layer.weight, layer.weight_shape))
    fp8.weight = nn.Parameter(weight, requires_grad=False)
    fp8.weight_scale = nn.Parameter(scale, requires_grad=False)
    if layer.bias is not None:
        fp8.bias = nn.Parameter(layer.bias.detach().to(layer.compute_dtype), requires_grad=False)
    return fp8.train(layer.training)


def convert_q8_0_linears(model: nn.Module, predicate, supported: bool | None = None) -> int:
    """Replace, in place, every Q8_0 QuantizedLinear for which predicate(name, module) holds by an FP8Linear, when
    `supported` (default: the current CUDA device has FP8). Returns how many were replaced (0 where not supported).
    Convert before LoRAs and offload hooks are attached, as for quantize_linears."""
    if not (device_computes_fp8() if supported is None else supported):
        return 0
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, QuantizedLinear) and module.quant_type == "Q8_0" and predicate(name, module)]
    hooked = [name for name, module in chosen if module._forward_hooks or module._forward_pre_hooks]
    if hooked:
        raise ValueError(f"{len(hooked)} Q8_0 linears to convert to FP8 carry hooks (a LoRA, offload?), first: "
                         f"{hooked[0]}; enable FP8 computation first, then load LoRAs and set up offloading")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, fp8_from_q8_0(module))
    return len(chosen)


def stored_types_without_fp8(model: nn.Module, predicate) -> list[str]:
    """The quantised types of the linears `predicate` selects that FP8 compute leaves as they are (sorted)."""
    return sorted({m.quant_type for name, m in model.named_modules()
                   if isinstance(m, QuantizedLinear) and predicate(name, m)})


def fp8_compute_from_gguf(model: nn.Module, predicate, supported: bool | None = None) -> int:
    """Before W8A8 is switched on: convert the Q8_0 linears (convert_q8_0_linears). Where no selected linear is left
    that FP8 can compute (every one quantised in another type, or Q8_0 on a GPU without FP8), one clear error
    instead of quantize_linears' 'no linear matches'. Returns how many were converted."""
    converted = convert_q8_0_linears(model, predicate, supported)
    computable = any(isinstance(m, (nn.Linear, FP8Linear)) and predicate(name, m) for name, m in model.named_modules())
    kept = stored_types_without_fp8(model, predicate)
    if kept and not computable:
        if kept == ["Q8_0"]:
            raise ValueError("FP8 computation from Q8_0 weights needs a GPU with FP8 tensor cores (compute "
                             f"capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer); without it the Q8_0 "
                             "weights compute through their own kernels: leave FP8 computation off")
        raise ValueError(f"FP8 computation takes float or Q8_0 weights; this model's linears are stored as "
                         f"{', '.join(kept)}, which compute through their dequantising kernels: load a Q8_0 (or "
                         "bf16) file for FP8, or leave FP8 computation off")
    return converted
