"""SwiGLU's up-projection as one gated GEMM: silu(x @ gate.T) * (x @ proj.T), the product formed in the epilogue.

Qwen-Image 2.1's MLP (`img_mlp`: gate_layer and proj, 4096 -> 12288 each, no bias) is, as two GEMMs, two
(rows, 12288) results written, then read again by the product's kernel that writes a third. quack's gated GEMM
(`quack-kernels`, CuTe DSL, installed with flash-attn-4) runs the two projections as one GEMM over the packed
[gate; proj] weight (models/packed_linears.py makes them views of one storage, so nothing is copied) and applies
SiLU and the product to the float32 accumulators, writing only the product: bench/quack_gemm21.py times it against
cuBLAS's two GEMMs and the compiled product. Behind the custom op `qistudio::linear_swiglu_quack`, so a compiled
block keeps one graph.

Its result differs from the reference form (GEMM, round, SiLU, round, product, round) by two bf16 roundings fewer,
so it serves inference on CUDA only; training, the CPU and GPUs without quack keep the reference form, which has
the backward.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .linear_gelu import _import_quack, resolve_quack, tma_loadable


def linear_swiglu_reference(x: torch.Tensor, gate_weight: torch.Tensor, proj_weight: torch.Tensor) -> torch.Tensor:
    return F.silu(F.linear(x, gate_weight)) * F.linear(x, proj_weight)


def swiglu_fusable(x: torch.Tensor) -> bool:
    """Whether the gated GEMM would serve x (..., K): CUDA inference in bf16 (the dtype its trial run and the GPU
    tests check), quack's gated GEMM running on this GPU. The caller decides before packing the weights
    (models/dit21.py)."""
    if not _enabled or not x.is_cuda or x.dtype != torch.bfloat16:
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return bool(_resolved) if torch.compiler.is_compiling() else resolve_swiglu()


_resolved: bool | None = None


def resolve_swiglu() -> bool:
    """Whether quack's gated GEMM runs here, decided once and outside traced code (the first eager call or
    `compile_repeated_blocks`): a graph traced before the decision keeps the two linears."""
    global _resolved
    if _resolved is None:
        _resolved = resolve_quack() and _gated_runs(torch.cuda.current_device())
    return _resolved


def _gated_runs(device_index: int) -> bool:
    """One small gated GEMM against the reference: quack's GELU epilogue running does not yet mean its gated,
    concat-layout form does (a different kernel), and a failure must leave the two linears in place rather than
    surface inside a forward."""
    try:
        with torch.device(f"cuda:{device_index}"):
            rows = torch.randn(128, 256, dtype=torch.bfloat16)
            packed = torch.randn(512, 256, dtype=torch.bfloat16) / 16
            expected = linear_swiglu_reference(rows.float(), *packed.float().split(256))
            result = _linear_swiglu_quack(rows, packed).float()
        return bool(((result - expected).norm() <= 1e-2 * expected.norm()).item())
    except Exception as error:  # the CuTe DSL failing to compile this kernel: not usable here, and worth saying
        warnings.warn(f"quack's gated GEMM failed a trial run ({type(error).__name__}: {error}); Qwen-Image 2.1's "
                      "MLP stays on two linears", RuntimeWarning, stacklevel=2)
        return False


def linear_swiglu(x: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ proj.T) with packed_weight = [gate; proj] (2N, K); x (..., K) -> (..., N).
    quack's gated GEMM where it serves (swiglu_fusable), else the packed GEMM then the product."""
    rows = x.reshape(-1, x.shape[-1])  # (T, K)
    hidden = packed_weight.shape[0] // 2
    if swiglu_fusable(x) and x.dtype == packed_weight.dtype:
        out = torch.ops.qistudio.linear_swiglu_quack(rows, packed_weight)  # (T, N)
    else:
        out = _packed_swiglu(rows, packed_weight)
    return out.view(*x.shape[:-1], hidden)


def _packed_swiglu(rows: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    """The packed GEMM (one cuBLAS call), then the product: what serves where quack's kernel does not."""
    gate, proj = F.linear(rows, packed_weight).split(packed_weight.shape[0] // 2, dim=-1)
    return F.silu(gate) * proj


_enabled = True


def set_fused_swiglu(enabled: bool) -> None:
    """Switch the gated GEMM off (or back on), for comparisons: the MLP then runs its two linears."""
    global _enabled
    _enabled = enabled


@torch.library.custom_op("qistudio::linear_swiglu_quack", mutates_args=())
def _linear_swiglu_quack(rows: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    """rows (T, K), packed_weight (2N, K) = [gate; proj] -> silu(rows @ gate.T) * (rows @ proj.T) (T, N), by
    quack's gated GEMM with its default configuration; rows or weights TMA cannot load take the packed cuBLAS
    GEMM."""
    hidden = packed_weight.shape[0] // 2
    if not (rows.is_cuda and tma_loadable(rows, packed_weight, packed_weight[0]) and hidden % 8 == 0):
        return _packed_swiglu(rows, packed_weight)
    _import_quack()  # applies quack's cache-key fix (ops/linear_gelu.py)
    from quack.gemm_interface import gemm_gated

    # concat_layout ("B",): B's (K, 2N) columns are [gate; proj] as stored, no interleaved copy.
    return gemm_gated(rows, packed_weight.t(), activation="swiglu", store_preact=False, tuned=False,
                      concat_layout=("B",))[1]


@_linear_swiglu_quack.register_fake
def _(rows, packed_weight):
    return rows.new_empty(rows.shape[0], packed_weight.shape[0] // 2)
