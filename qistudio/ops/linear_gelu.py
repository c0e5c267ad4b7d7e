"""GELU(tanh) of a linear layer's output, with the bias and the GELU in the GEMM's epilogue.

The DiT's MLP up-projection (3072 -> 12288) is followed by a tanh GELU. As two steps, the 12288-wide hidden rows are
written by the GEMM, then read and written again by the GELU: at 1328x1328 with guidance batched that pass is about
0.25 ms of a 7.3 ms block on an H100 (bench/RESULTS.md, fourth pass), and inductor cannot fuse it into cuBLAS's
GEMM. Two epilogue forms, in order of preference:

- quack's SM90/SM100 GEMM (`quack-kernels`, CuTe DSL, installed with flash-attn-4) with its tanh-GELU epilogue:
  on a power-limited H200, 13778 x 3072 -> 12288 took 1.45 ms against 1.61-1.63 ms for cuBLAS's epilogue, 10%
  less, within 6e-6 of cuBLAS's result (bench/quack_gemm.py). Behind the custom op `qistudio::linear_gelu_quack`, so
  a compiled block keeps one graph.
- cuBLASLt's GELU_BIAS epilogue (tanh approximation, the one the model uses), which applies the bias and the GELU to
  the float32 accumulator before the single rounding to bf16; PyTorch reaches it through
  `torch._addmm_activation(..., use_gelu=True)`, which inductor keeps as one extern call.

Either result differs from the reference form (bias, round, GELU, round) by one bf16 rounding fewer, so the
epilogues are used in inference on CUDA only; training and CPU keep the reference form, which has the backward.
"""

from __future__ import annotations

import functools
import types
import warnings

import torch
import torch.nn.functional as F


def linear_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GELU_tanh(x @ weight.T + bias); x (..., K), weight (N, K), bias (N,) -> (..., N)."""
    if not _can_fuse(x, weight, bias):
        return linear_gelu_reference(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # (T, K)
    quack = (_quack_resolved or False) if torch.compiler.is_compiling() else resolve_quack()
    if _use_quack and quack:
        out = torch.ops.qistudio.linear_gelu_quack(rows, weight, bias)
    else:
        out = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)  # (T, N)
    return out.view(*x.shape[:-1], weight.shape[0])


def _can_fuse(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if _disabled or bias is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return False
    # The epilogues want the GEMM's own dtype throughout and a bias as long as a row of the output.
    return weight.dtype == bias.dtype == x.dtype and weight.dim() == 2 and bias.dim() == 1 and x.numel() > 0


_disabled = False
_use_quack = True


def set_fused_linear_gelu(enabled: bool) -> None:
    """Switch the epilogue forms off (or back on), for comparisons."""
    global _disabled
    _disabled = not enabled


def set_quack_linear_gelu(enabled: bool) -> None:
    """Prefer quack's GEMM where it runs (the default), or always cuBLASLt's epilogue; for comparisons."""
    global _use_quack
    _use_quack = enabled


_quack_resolved: bool | None = None


def resolve_quack() -> bool:
    """Whether quack's GEMM runs here (on the current GPU), decided once and outside traced code (the first eager
    call or `compile_repeated_blocks`): importing it inside a traced block would break the graph. A graph traced
    before the decision uses cuBLASLt's epilogue."""
    global _quack_resolved
    if _quack_resolved is None:
        _quack_resolved = quack_available()
    return _quack_resolved


def quack_available(device_index: int | None = None) -> bool:
    """Whether quack's GEMM imports and runs on this GPU (default: the current one): SM90 Hopper, SM100 Blackwell."""
    if not torch.cuda.is_available():
        return False
    return _quack_on(torch.cuda.current_device() if device_index is None else device_index)


@functools.cache
def _quack_on(device_index: int) -> bool:
    if torch.cuda.get_device_capability(device_index)[0] not in (9, 10):
        return False
    try:
        _import_quack()
        # One small GEMM through the op's own path: an import that succeeds does not yet mean the CuTe DSL
        # compiles and runs here (a quack release against a newer DSL may not), and a failure must leave the
        # cuBLASLt epilogue in place rather than surface inside a forward.
        with torch.device(f"cuda:{device_index}"):
            rows, weight = torch.randn(128, 256, dtype=torch.bfloat16), torch.randn(256, 256, dtype=torch.bfloat16)
            bias = torch.randn(256, dtype=torch.bfloat16)
            expected = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True).float()
            result = _quack_gelu(rows, weight, bias).float()
        return bool(((result - expected).norm() <= 1e-2 * expected.norm()).item())
    except ImportError:
        return False
    except Exception as error:  # the CuTe DSL failing to load or to compile: not usable here, and worth saying
        warnings.warn(f"quack is installed but its GEMM failed a trial run ({type(error).__name__}: {error}); "
                      "the MLP's GELU epilogue stays on cuBLASLt", RuntimeWarning, stacklevel=2)
        return False


# Built-in callables and descriptors: code, not values a traced epilogue could depend on.
_C_LEVEL_CODE = (types.MethodDescriptorType, types.WrapperDescriptorType, types.MethodWrapperType,
                 types.ClassMethodDescriptorType, types.GetSetDescriptorType, types.MemberDescriptorType,
                 types.BuiltinFunctionType)


def _dsl_state(value) -> bool:
    """Whether `value` is an instance of a class of cutlass-dsl's base package (its IR and cache state)."""
    return type(value).__module__.startswith("cutlass.base_dsl.")


@functools.cache
def _import_quack():
    import contextvars
    import itertools
    import logging

    import quack.gemm_runtime.identity as identity
    from quack.gemm_interface import gemm_act

    # quack keys its compiled kernels by a fingerprint of what an epilogue function closes over, and quack 0.6.5
    # raises on objects that cutlass-dsl 4.8's helpers reach (a ContextVar, a code object's method, the DSL's
    # "CUTE_DSL" logger: seen on an H200 with flash-attn-4 4.0.0b36 installed beside it; the DSL's own
    # IdentityKeyedWeakTable of IR state: seen on an H100), so no GEMM with an epilogue runs. Such objects are the
    # DSL's own machinery, shared by every epilogue and carrying no value of the traced math: keyed by type and
    # name they keep the fingerprint's distinctions. Anything else still raises, as quack intends.
    original = identity.semantic_value_key

    def semantic_value_key(value, *args, **kwargs):
        try:
            return original(value, *args, **kwargs)
        except TypeError:
            if (isinstance(value, (contextvars.ContextVar, logging.Logger, itertools.count, *_C_LEVEL_CODE))
                    or _dsl_state(value)):
                return ("dsl-internal", type(value).__qualname__, getattr(value, "__qualname__", None),
                        getattr(value, "name", None))
            raise

    identity.semantic_value_key = semantic_value_key
    return gemm_act


def _quack_gelu(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    gemm_act = _import_quack()
    return gemm_act(rows, weight.t(), bias=bias, activation="gelu_tanh_approx", store_preact=False, tuned=False)[1]


@torch.library.custom_op("qistudio::linear_gelu_quack", mutates_args=())
def _linear_gelu_quack(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """rows (T, K), weight (N, K), bias (N,) -> GELU_tanh(rows @ weight.T + bias) (T, N), by quack's SM90 GEMM with
    its default configuration (its autotuner found nothing faster for these shapes and costs tens of seconds)."""
    if not (rows.is_cuda and tma_loadable(rows, weight, bias)):
        return torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)
    return _quack_gelu(rows, weight, bias)


def tma_loadable(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """quack's kernels load and store through TMA: 16-bit tensors on one device, dense, 16-byte aligned starts and
    row pitches (sizes multiple of 8). The model's widths all are; a slice or an odd test size takes cuBLASLt's
    path."""
    tensors = (rows, weight, bias)
    return (all(t.element_size() == 2 and t.device == rows.device and t.is_contiguous() and t.data_ptr() % 16 == 0
                for t in tensors)
            and rows.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0)


@_linear_gelu_quack.register_fake
def _(rows, weight, bias):
    return rows.new_empty(rows.shape[0], weight.shape[0])
