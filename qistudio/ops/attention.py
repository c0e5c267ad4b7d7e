"""One attention entry point for every model: `attention(query, key, value, key_lengths=None)`.

Layout is (batch, sequence, heads, head_dim). Qwen-Image's joint sequence is laid out [image, text] here, so the
text padding of a batch always sits at the end of each row: a sample with `key_lengths[i]` valid keys is attended
by slicing its keys, never by an additive mask. Padding therefore costs nothing and cannot change a result.
Softmax attention is invariant to the order of keys, so this equals the reference's [text, image] order.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .flex_mask import FlexMask, flex_masked_attention
from .split_attention import SplitMask, split_attention

# Backends by name. The automatic choice is "flash4" where the flash-attn-4 wheel is installed on a Hopper or
# Blackwell GPU (its CuTe DSL kernels, ops/flash4.py: 635 against 613 TFLOP/s for cuDNN on an H100 at this model's
# shapes, 4% off a compiled 1328x1328 DiT forward), else "sdpa": PyTorch's dispatcher, which on Hopper picks cuDNN's
# fused attention (about 610-630 TFLOP/s, against 370 for its flash kernel and 386 for SageAttention 1's INT8
# Triton kernel; bench/RESULTS.md). The others are used when forced: "cudnn_fp8" (nvidia-cudnn-frontend; FP8
# q/k/v/P, 6% error, ops/fp8_attention.py; the DiT under FP8 compute also uses it by itself, see
# set_fp8_attention), "sage" (sageattention), "flash3" (FlashAttention 3's flash_attn_interface).
_BACKENDS = ("sdpa", "cudnn_fp8", "sage", "flash3", "flash4")
_forced_backend: str | None = None


def available_backends() -> list[str]:
    """The backends that can run here (installed, and on a GPU that supports them)."""
    from .flash4 import flash4_available
    from .fp8_attention import cudnn_fp8_available

    found = ["sdpa"]
    if cudnn_fp8_available():
        found.append("cudnn_fp8")
    if flash4_available():
        found.append("flash4")
    for name, module in (("sage", "sageattention"), ("flash3", "flash_attn_interface")):
        try:
            __import__(module)
        except ImportError:
            continue
        if torch.cuda.is_available():
            found.append(name)
    return found


def set_attention_backend(name: str | None) -> None:
    """Force a backend for every later call (None: choose automatically: "flash4" where it runs, else "sdpa")."""
    global _forced_backend
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(_BACKENDS)}")
    if name is not None and name not in available_backends():
        raise ValueError(f"attention backend {name!r} cannot run here (installed and runnable: "
                         f"{', '.join(available_backends())}); 'cudnn_fp8' needs nvidia-cudnn-frontend and a Hopper "
                         "or newer GPU, 'sage' sageattention, 'flash3' FlashAttention 3, 'flash4' "
                         "flash-attn-4 on a Hopper or Blackwell GPU (the hopper extra installs cudnn_fp8's and "
                         "flash4's: pip install 'qistudio[hopper]')")
    _forced_backend = name


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None):
    # SDPA wants (B, H, S, D).
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def _cudnn_fp8(query, key, value):
    from .fp8_attention import cudnn_fp8_attention

    return cudnn_fp8_attention(query, key, value)


def _sage(query, key, value):
    from sageattention import sageattn

    return sageattn(query, key, value, tensor_layout="NHD", is_causal=False)


def _flash3(query, key, value):
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(query, key, value)
    return out[0] if isinstance(out, tuple) else out


def _flash4_runs(query, key, value) -> bool:
    # Its forward covers half-precision head dims of 8..256 (multiples of 8); the VAE's one 384-wide head, float32
    # work and training go to SDPA.
    head_dim = query.shape[-1]
    return (query.dtype in (torch.bfloat16, torch.float16) and head_dim <= 256 and head_dim % 8 == 0
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))))


def _flash4(query, key, value):
    from .flash4 import flash4_attention

    if not _flash4_runs(query, key, value):
        return _sdpa(query, key, value)
    return flash4_attention(query, key, value)


def set_fp8_attention(model: torch.nn.Module, enabled: bool = True) -> int:
    """Ask every attention module of `model` that can (those with an `fp8_attention` flag) for FP8 attention,
    used where cuDNN's FP8 kernel runs; returns how many modules."""
    modules = [m for m in model.modules() if hasattr(type(m), "fp8_attention")]
    for module in modules:
        module.fp8_attention = enabled
    return len(modules)


def fp8_attention_enabled(query: torch.Tensor, requested: bool = False) -> bool:
    """Whether this attention runs in FP8: asked for by its module (`set_fp8_attention`) or forced for all
    ("cudnn_fp8"), on a GPU where the kernel runs, without gradients. Callers then hand FP8 inputs directly to
    `attention_fp8`, skipping the bf16 round trip."""
    from .fp8_attention import fp8_attention_runs

    wanted = requested or _forced_backend == "cudnn_fp8"
    # A sequence-parallel attention in force says whether it has an FP8 form (ring attention has none).
    return (wanted and not torch.is_grad_enabled() and getattr(_override, "takes_fp8", True)
            and fp8_attention_runs(query.device))


def attention_fp8(q8, k8, v8, q_descale, k_descale, v_descale, key_lengths: list[int] | None = None):
    """FP8 attention of pre-quantised (B, S, H, D) tensors (per-tensor descales); returns the float8 output, whose
    descale is v's. Padding: each sample's valid key count goes to the kernel's padding mask (one launch)."""
    from . import fp8_attention  # noqa: F401  (registers the op)

    if _override is not None:  # Ulysses: its FP8 form (qistudio/parallel/attention.py)
        return _override.fp8(q8, k8, v8, q_descale, k_descale, v_descale, key_lengths)
    seq_k = k8.shape[1]
    sdpa = torch.ops.qistudio.cudnn_fp8_sdpa
    if key_lengths is None or all(n == seq_k for n in key_lengths):
        return sdpa(q8, k8, v8, q_descale, k_descale, v_descale)
    return sdpa(q8, k8, v8, q_descale, k_descale, v_descale, list(key_lengths))  # cuDNN's padding mask


def attention_fp8_value(parts: list[torch.Tensor], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v for `attention_fp8`: (B, S_i, D) parts joined along the sequence as float8 (B, sum S_i, H, head_dim) with
    one descale. Under sequence parallelism the override quantises it, with the scale of the whole sequence."""
    if _override is not None:
        return _override.quantize_value(parts, head_dim)
    from .fp8_attention import quantize_joined

    return quantize_joined(parts, head_dim)


def prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_key: torch.Tensor,
                     prefix_value: torch.Tensor) -> torch.Tensor:
    """Queries (B, T, H, D) over [prefix; their own keys]: prefix_key / prefix_value (B|1, P, H, D) before key /
    value (B, T, H, D) (Qwen-Image 2.1's target pass over its cached prefix). Under sequence parallelism the
    override takes the parts apart (each rank's prefix holding its heads only)."""
    if _override is not None:
        return _override.prefix_attention(query, key, value, prefix_key, prefix_value)
    batch = query.shape[0]
    return attention(query, torch.cat([prefix_key.expand(batch, -1, -1, -1), key], dim=1),
                     torch.cat([prefix_value.expand(batch, -1, -1, -1), value], dim=1))


_KERNELS = {"sdpa": _sdpa, "cudnn_fp8": _cudnn_fp8, "sage": _sage, "flash3": _flash3, "flash4": _flash4}


_automatic_backend: str | None = None


def resolve_automatic_backend() -> str:
    """The automatic choice, made once, outside traced code (the first eager call or `compile_repeated_blocks`):
    "flash4" where it runs, else "sdpa". A graph traced before the choice was made uses "sdpa"."""
    global _automatic_backend
    if _automatic_backend is None:
        from .flash4 import flash4_available

        _automatic_backend = "flash4" if flash4_available() else "sdpa"
    return _automatic_backend


def _kernel(query: torch.Tensor):
    if not query.is_cuda:
        return _sdpa  # the optional kernels are GPU-only; CPU work (tests, offload previews) stays on SDPA
    name = _forced_backend
    if name is None:
        name = (_automatic_backend or "sdpa") if torch.compiler.is_compiling() else resolve_automatic_backend()
    return _KERNELS[name]


# Sequence parallelism (qistudio/parallel) stands in for this entry during a sharded DiT forward: a callable with
# attention's signature, set by `attention_override` for the forward's duration (None inside it: plain again).
_override = None


@contextmanager
def attention_override(fn):
    global _override
    previous, _override = _override, fn
    try:
        yield
    finally:
        _override = previous


def attention_streams() -> bool:
    """Whether the attention in force takes q, k and v one at a time as they are made (`attention_input`):
    Ulysses sequence parallelism, which starts sending each to the other ranks while the next is computed."""
    return getattr(_override, "streams", False)


def attention_input(index: int, tensor: torch.Tensor):
    """q (0), k (1) or v (2), (B, S, H, D), handed to the attention in force as soon as it is made; what comes back
    goes to `attention` in its place (the tensor itself when nothing streams)."""
    return _override.prepare(index, tensor) if attention_streams() else tensor


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_lengths: list[int] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention, (B, S, H, D) in and out.

    key_lengths: per sample, how many leading keys are valid (the rest is padding); None means all.
    mask: an explicit boolean mask (B, 1|H, S_q, S_k), True = may attend; or a SplitMask (EliGen's structure,
    computed without a dense mask); or a FlexMask (either, as FlexAttention's block mask: inside compiled blocks).
    """
    if _override is not None:
        return _override(query, key, value, key_lengths, mask)
    seq_k = key.shape[1]
    if isinstance(mask, FlexMask):
        return flex_masked_attention(query, key, value, mask)
    if isinstance(mask, SplitMask):
        return split_attention(query, key, value, mask)
    if mask is not None:
        return _sdpa(query, key, value, mask)
    kernel = _kernel(query)
    if key_lengths is None or all(n == seq_k for n in key_lengths):
        return kernel(query, key, value)
    # The kernels that take per-sample key counts run a padded batch in one launch.
    if kernel is _flash4 and _flash4_runs(query, key, value):
        from .flash4 import flash4_attention

        return flash4_attention(query, key, value, list(key_lengths))
    if kernel is _cudnn_fp8:
        from .fp8_attention import cudnn_fp8_attention

        return cudnn_fp8_attention(query, key, value, list(key_lengths))
    outputs = [
        kernel(query[i : i + 1], key[i : i + 1, :n], value[i : i + 1, :n]) for i, n in enumerate(key_lengths)
    ]
    return torch.cat(outputs, dim=0)
