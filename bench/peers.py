"""The peers at their best: diffusers' attention backends (FlashAttention 4 included), its FP8 through torchao, and
the kernel each side runs, named the same way for both so that a table can pair rows that run the same kernel.

diffusers 0.42.1 dispatches attention by name (`attention_dispatch.AttentionBackendName`); a model's processors
carry the name (`ModelMixin.set_attention_backend` sets `processor._attention_backend` after checking the
backend's package). Its FlashAttention 4 entry, `flash_4_hub`, fetches the kernel from the Hugging Face hub with
the `kernels` package, which cannot run offline; `use_flash4_in_diffusers` gives that entry the kernel of the
flash-attn-4 wheel qistudio runs (through the same custom op, so torch.compile keeps one graph), and
`set_diffusers_backend` sets the processors' name directly, skipping only the hub checks. Everything else in the
call is diffusers' own code.
"""

from __future__ import annotations

import importlib.metadata

import torch
import torch.nn as nn

# One label per kernel, used on both sides, so that rows running the same kernel read the same.
KERNELS = {
    "sdpa": "SDPA dispatch (cuDNN fused attention on Hopper)",
    "cudnn": "SDPA forced to cuDNN",
    "flash2": "SDPA forced to its flash kernel (FlashAttention 2)",
    "efficient": "SDPA forced to mem-efficient",
    "flex": "FlexAttention",
    "sage": "SageAttention",
    "flash3": "FlashAttention 3",
    "flash4": "FlashAttention 4 (flash-attn-4)",
    "cudnn_fp8": "cuDNN FP8 SDPA",
}
# diffusers' dispatch name -> kernel; ours: qistudio.ops.attention backend -> kernel.
DIFFUSERS_KERNEL = {"native": "sdpa", "_native_cudnn": "cudnn", "_native_flash": "flash2",
                    "_native_efficient": "efficient", "flex": "flex", "sage": "sage", "_flash_3": "flash3",
                    "flash4": "flash4"}
OURS_KERNEL = {"sdpa": "sdpa", "flash4": "flash4", "cudnn_fp8": "cudnn_fp8", "sage": "sage", "flash3": "flash3"}
# diffusers' backends whose eager form is not the backend at its best (FlexAttention unfused materialises the
# scores): timed only compiled, where asked for.
COMPILED_ONLY = {"flex"}


def _flash4_kernel(q, k, v, softmax_scale=None, causal=False):
    """The hub kernel's call signature over the flash-attn-4 wheel (through qistudio's custom op, which only
    wraps `flash_attn.cute.flash_attn_func` so that a compiled block can call it)."""
    if softmax_scale is not None or causal:
        raise ValueError("this FlashAttention 4 entry covers the non-causal, default-scale case diffusers' "
                         "Qwen-Image DiT uses")
    from qistudio.ops.flash4 import flash4_attention

    return flash4_attention(q, k, v)


def use_flash4_in_diffusers() -> None:
    """Point diffusers' `flash_4_hub` entry at the installed flash-attn-4 kernel (no hub download)."""
    from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY, AttentionBackendName

    _HUB_KERNELS_REGISTRY[AttentionBackendName.FLASH_4_HUB].kernel_fn = _flash4_kernel


def diffusers_backend_problem(name: str) -> str | None:
    """Why diffusers' backend `name` cannot run here, or None."""
    from diffusers.models import attention_dispatch as dispatch

    if name not in DIFFUSERS_KERNEL:
        return f"not a backend this bench knows ({', '.join(DIFFUSERS_KERNEL)})"
    if not torch.cuda.is_available():
        return None if name == "native" else "needs CUDA"
    if name == "flash4":
        from qistudio.ops.flash4 import flash4_available

        return None if flash4_available() else "flash-attn-4 not installed or not runnable on this GPU"
    if name == "sage" and not dispatch._CAN_USE_SAGE_ATTN:
        return f"needs sageattention>={dispatch._REQUIRED_SAGE_VERSION} (PyPI has 1.x only)"
    if name == "_flash_3" and not dispatch._CAN_USE_FLASH_ATTN_3:
        return "FlashAttention 3 (flash_attn_interface) not installed: no wheel for this torch"
    if name == "flex" and not dispatch._CAN_USE_FLEX_ATTN:
        return "FlexAttention unavailable in this torch"
    return None


def set_diffusers_backend(model: nn.Module, name: str) -> None:
    """Every attention processor of a diffusers model uses backend `name` (what `set_attention_backend` does after
    its package checks; for "flash4" the wheel's kernel stands in for the hub's)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    problem = diffusers_backend_problem(name)
    if problem:
        raise RuntimeError(f"diffusers backend {name!r} cannot run here: {problem}")
    if name == "flash4":
        use_flash4_in_diffusers()
        backend = AttentionBackendName.FLASH_4_HUB
    else:
        backend = AttentionBackendName(name)
    count = 0
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = backend
            count += 1
    if not count:
        raise RuntimeError(f"{type(model).__name__} has no attention processor that takes a backend")


def ours_backends() -> list[str]:
    """Our attention backends that run here, in a fixed order (bf16 ones; cudnn_fp8 is an FP8 path)."""
    from qistudio.ops.attention import available_backends

    found = available_backends()
    return [name for name in ("sdpa", "flash4", "sage", "flash3") if name in found]


def diffusers_backends(eager: bool) -> tuple[list[str], dict[str, str]]:
    """(runnable backends, {backend: why not} for the others), in a fixed order."""
    runnable, skipped = [], {}
    for name in DIFFUSERS_KERNEL:
        problem = diffusers_backend_problem(name)
        if problem is None and eager and name in COMPILED_ONLY:
            problem = "eager FlexAttention is its unfused reference form; timed compiled only"
        if problem:
            skipped[name] = problem
        else:
            runnable.append(name)
    return runnable, skipped


def torchao_fp8(model: nn.Module, scope: str = "blocks") -> str:
    """diffusers' FP8 route: torchao's float8 dynamic-activation, float8-weight quantisation with per-row scales
    (what `TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))` applies while loading).
    scope "blocks": the transformer blocks' linears, the layers our FP8 compute covers; "all": every linear.
    Returns a description for the table."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    if scope not in ("blocks", "all"):
        raise ValueError(f"torchao scope must be 'blocks' or 'all', got {scope!r}")
    chosen = []

    def wanted(module: nn.Module, name: str) -> bool:
        keep = isinstance(module, nn.Linear) and (scope == "all" or name.startswith("transformer_blocks."))
        if keep:
            chosen.append(name)
        return keep

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=wanted)
    version = importlib.metadata.version("torchao")
    return f"torchao {version} float8 dynamic act. + weight, per-row scales, {len(chosen)} linears ({scope})"
