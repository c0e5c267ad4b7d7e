"""FlashAttention 4 (the `flash-attn-4` wheel, CuTe DSL kernels for Hopper and Blackwell) as a PyTorch custom op.

The kernels are JIT-compiled Python objects that torch.compile cannot trace; behind `qistudio::flash4_attention`
a compiled DiT block keeps one graph and calls the kernel as an opaque op. Forward only: training keeps SDPA
(its backward is PyTorch's own and is what the gradients were checked against).
"""

from __future__ import annotations

import functools

import torch

from .fused import key_lengths_tensor


def flash4_available(device_index: int | None = None) -> bool:
    """Whether `flash_attn.cute` imports and this GPU (default: the current one) is one its forward supports (SM90
    Hopper, SM100 Blackwell)."""
    if not torch.cuda.is_available():
        return False
    return _available(torch.cuda.current_device() if device_index is None else device_index)


@functools.cache
def _available(device_index: int) -> bool:
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401
    except Exception:  # ImportError, or the CuTe DSL runtime failing to load: either way not usable here
        return False
    major, _ = torch.cuda.get_device_capability(device_index)
    return major in (9, 10)


@torch.library.custom_op("qistudio::flash4_attention", mutates_args=())
def flash4_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     key_lengths: list[int] | None = None) -> torch.Tensor:
    """Softmax attention of (B, S, H, D) bf16/fp16 tensors, (B, S_q, H, D) out. key_lengths[i]: the valid leading
    keys of sample i (the kernel's `seqused_k`), so a padded batch is one launch instead of one per sample."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    if key_lengths is None:
        result = flash_attn_func(query, key, value)
    else:
        result = flash_attn_varlen_func(query, key, value,
                                        seqused_k=key_lengths_tensor(tuple(key_lengths), query.device))
    return result[0] if isinstance(result, tuple) else result


@flash4_attention.register_fake
def _(query, key, value, key_lengths=None):
    return query.new_empty(query.shape[:-1] + value.shape[-1:])
