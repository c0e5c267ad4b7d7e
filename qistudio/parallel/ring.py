"""Ring attention: each rank's image keys and values travel once around the ring, partial softmaxes merged exactly.

Design note. A rank holds the queries of its image chunk and the text (replicated on every rank). For ring step i
it attends its queries to the K/V chunk that arrived from i ranks back while sending that chunk on (the transfer
overlaps the attention), and keeps the partial result with its log-sum-exp. Two partial softmaxes over disjoint
key sets combine exactly: out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b), lse = log(e^lse_a +
e^lse_b); the text keys (local) are one more partial. The partials come from the project's fused attention with
log-sum-exp (ops/split_attention.py); the merge here also carries the running lse and keeps rows that see
nothing at all (masked text padding) at zero instead of NaN.

The text queries' partials are merged in ring-chunk order, not arrival order, so every rank gets the same text
output to the last bit and the replicated text stream stays identical across ranks.
"""

from __future__ import annotations

import torch

from ..ops.split_attention import _attention_with_lse
from .collectives import RingShift
from .layout import TokenLayout
from .masks import IMAGE, TEXT, JointMask

Partial = tuple[torch.Tensor, torch.Tensor]  # out (B, H, S, D) float32, lse (B, H, S) float32


def partial_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      allowed: torch.Tensor | None) -> Partial:
    """Softmax attention of (B, H, S, D) tensors over these keys only, with its log-sum-exp; allowed: (B|1, 1,
    S_q, S_k) bool or None."""
    bias = None
    if allowed is not None:
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=query.device).masked_fill_(~allowed, -torch.inf)
    out, lse = _attention_with_lse(query, key, value, bias)
    if allowed is not None:
        out = torch.nan_to_num(out)  # a row that sees nothing: its weight in the merge is 0 anyway
    return out.float(), lse


def _key_partial(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: JointMask, query_part: str,
                 rows: torch.Tensor, key_part: str, columns: torch.Tensor) -> Partial:
    """partial_attention of these queries over these keys under `mask`. Text keys whose only limit is each row's
    text length are sliced per row, as the one-process attention does, rather than masked: the fused kernel
    without a bias (the padding of batched guidance)."""
    if key_part == TEXT and mask.mask is None and mask.lengths is not None:
        parts = []
        for row, length in enumerate(mask.lengths):
            if length:
                parts.append(partial_attention(query[row : row + 1], key[row : row + 1, :, :length],
                                               value[row : row + 1, :, :length], None))
            else:  # sees no text: a partial of weight 0
                out = torch.zeros_like(query[row : row + 1], dtype=torch.float32)
                parts.append((out, torch.full(out.shape[:-1], -torch.inf, device=out.device)))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return partial_attention(query, key, value, mask.allowed(query_part, rows, key_part, columns))


def merge(total: Partial | None, part: Partial) -> Partial:
    """Two partial attentions over disjoint key sets as one."""
    if total is None:
        return part
    (out_a, lse_a), (out_b, lse_b) = total, part
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # both -inf: weights 0, not NaN
    return out_a * torch.exp(lse_a - finite)[..., None] + out_b * torch.exp(lse_b - finite)[..., None], lse


def ring_attention(image: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor, torch.Tensor], layout: TokenLayout,
                   mask: JointMask, group, ring_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """image: q, k, v of this rank's ring chunk stacked (3, B, C, H, D); text: q, k, v each (B, L, H, D).
    Returns the attention outputs (B, C, H, D) and (B, L, H, D) over the whole joint sequence."""
    dtype, ring_size = image.dtype, layout.ring
    image_query = image[0].transpose(1, 2)  # (B, H, C, D)
    text_query, text_key, text_value = (t.transpose(1, 2) for t in text)
    rows = layout.ring_chunk_positions(ring_rank, image.device)
    text_positions = torch.arange(text_query.shape[2], device=image.device)
    image_total, text_parts = None, {}
    current, owner = image[1:], ring_rank  # (2, B, C, H, D): the chunk in hand and whose it is
    for step in range(ring_size):
        shift = RingShift(current, group, ring_size) if step < ring_size - 1 else None
        valid = layout.valid_in_ring_chunk(owner)
        if valid:
            columns = layout.ring_chunk_positions(owner, image.device)[:valid]
            key, value = (t[:, :valid].transpose(1, 2) for t in current)
            image_total = merge(image_total, partial_attention(image_query, key, value,
                                                               mask.allowed(IMAGE, rows, IMAGE, columns)))
            text_parts[owner] = partial_attention(text_query, key, value,
                                                  mask.allowed(TEXT, text_positions, IMAGE, columns))
        if shift is not None:
            current, owner = shift.result(), (owner - 1) % ring_size
    image_total = merge(image_total, _key_partial(image_query, text_key, text_value, mask, IMAGE, rows, TEXT,
                                                  text_positions))
    text_total = None
    for chunk in sorted(text_parts):
        text_total = merge(text_total, text_parts[chunk])
    text_total = merge(text_total, _key_partial(text_query, text_key, text_value, mask, TEXT, text_positions, TEXT,
                                                text_positions))
    return image_total[0].transpose(1, 2).to(dtype), text_total[0].transpose(1, 2).to(dtype)
