"""One attention entry point for every model: `attention(query, key, value, key_lengths=None)`.

Layout is (batch, sequence, heads, head_dim). Qwen-Image's joint sequence is laid out [image, text] here, so the
text padding of a batch always sits at the end of each row: a sample with `key_lengths[i]` valid keys is attended
by slicing its keys, never by an additive mask. Padding therefore costs nothing and cannot change a result.
Softmax attention is invariant to the order of keys, so this equals the reference's [text, image] order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .split_attention import SplitMask, split_attention

# Only PyTorch's SDPA for now: its dispatcher already picks cuDNN's fused attention for this model's shapes on
# Hopper (about 630 TFLOP/s on an H200 at head_dim 128, ~7k tokens, against 370 for the flash kernel;
# bench/attention.py). Faster kernels (FlashAttention 3, SageAttention) plug in here as further names.
_BACKENDS = ("sdpa",)
_forced_backend: str | None = None


def set_attention_backend(name: str | None) -> None:
    """Force a backend for every later call (None: choose automatically)."""
    global _forced_backend
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available; choose one of {_BACKENDS}")
    _forced_backend = name


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None):
    # SDPA wants (B, H, S, D).
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


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
    computed without a dense mask).
    """
    seq_k = key.shape[1]
    if isinstance(mask, SplitMask):
        return split_attention(query, key, value, mask)
    if mask is not None:
        return _sdpa(query, key, value, mask)
    kernel = _sdpa
    if key_lengths is None or all(n == seq_k for n in key_lengths):
        return kernel(query, key, value)
    outputs = [
        kernel(query[i : i + 1], key[i : i + 1, :n], value[i : i + 1, :n]) for i, n in enumerate(key_lengths)
    ]
    return torch.cat(outputs, dim=0)
