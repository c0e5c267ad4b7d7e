"""Masked attention inside compiled blocks: FlexAttention with a block mask built once per DiT forward.

Why: eagerly, EliGen's structure runs as split attention (ops/split_attention.py: the fused kernel on the image
block, the text part merged in by log-sum-exp), but those kernels' log-sum-exp entry points do not trace, and a
dense boolean mask sends SDPA to its slow masked kernel over all S^2 scores. Under torch.compile, FlexAttention
is the masked kernel: inductor generates it from the block mask, skips blocks that are fully masked, and runs
fully visible blocks (here the whole image x image square) without evaluating the mask at all.

The block mask is built once per forward, outside the compiled blocks (the 60 blocks share it), from the dense
boolean structure: per 128 x 128 tile, "all allowed" (full), "some allowed" (partial: the mask is looked up per
score) or "none" (skipped). Rows that see nothing (EliGen's text padding) come out as zeros here, where split
attention lets them see themselves; they are never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .split_attention import SplitMask

TILE = 128  # FlexAttention's default block size


@dataclass
class FlexMask:
    """A boolean attention structure as FlexAttention's BlockMask; pass it as `attention(..., mask=)`."""

    block_mask: BlockMask


def _tile_indices(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, q tiles, kv tiles) bool -> per q tile the count (B, 1, nq) and the kv tile indices, flagged ones first
    (B, 1, nq, nk), int32, as BlockMask.from_kv_blocks wants."""
    counts = flags.sum(-1, dtype=torch.int32)
    order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


def flex_mask(mask: torch.Tensor | SplitMask, seq_len: int) -> FlexMask:
    """The block mask of `mask` over a joint sequence of `seq_len` tokens: a SplitMask (EliGen), or a boolean
    (B, 1, S | 1, S) mask (True = may attend), e.g. the key mask of rows with different condition layouts."""
    if isinstance(mask, SplitMask):
        allowed = mask.dense()[:, 0]  # (B, S, S)
    elif mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1:
        allowed = mask[:, 0]  # (B, S | 1, S)
    else:
        raise ValueError(f"flex_mask takes a SplitMask or a (B, 1, S|1, S) bool mask, got {tuple(mask.shape)} "
                         f"{mask.dtype}")
    if allowed.shape[-1] != seq_len or allowed.shape[-2] not in (1, seq_len):
        raise ValueError(f"a mask over {allowed.shape[-1]} tokens does not cover a sequence of {seq_len} tokens")
    batch = allowed.shape[0]
    tiles = -(-seq_len // TILE)
    padded = allowed.new_zeros(batch, allowed.shape[1], tiles * TILE)
    padded[..., :seq_len] = allowed
    if allowed.shape[1] == 1:  # a key mask: every query row alike
        key_tiles = padded.view(batch, 1, tiles, TILE)
        any_, all_ = key_tiles.any(-1), key_tiles.all(-1)  # (B, 1, nk)
        any_, all_ = any_.expand(batch, tiles, tiles), all_.expand(batch, tiles, tiles)
        keys = allowed[:, 0]  # (B, S)

        # Bounds come from the captured tensor, not a captured int: an int would be a compile guard (a recompile
        # per sequence length).
        def mask_mod(b, h, q, kv):
            return keys[b, kv.clamp(max=keys.shape[-1] - 1)]
    else:
        rows = allowed.new_zeros(batch, tiles * TILE, tiles * TILE)
        rows[:, :seq_len] = padded
        grid = rows.view(batch, tiles, TILE, tiles, TILE)
        any_, all_ = grid.any(dim=(2, 4)), grid.all(dim=(2, 4))  # (B, nq, nk)
        table = allowed.contiguous()

        def mask_mod(b, h, q, kv):
            return table[b, q.clamp(max=table.shape[-2] - 1), kv.clamp(max=table.shape[-1] - 1)]
    # The last tile row/column runs past the sequence (padding False), so it is never "full"; the kernel also
    # bounds every index by the sequence length.
    partial, full = any_ & ~all_, all_
    kv_num, kv_idx = _tile_indices(partial)
    full_num, full_idx = _tile_indices(full)
    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=TILE, mask_mod=mask_mod,
                                          seq_lengths=(seq_len, seq_len))
    return FlexMask(block_mask)


def flex_masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: FlexMask):
    """Attention of (B, S, H, D) tensors under a FlexMask."""
    out = flex_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                         block_mask=mask.block_mask)
    return out.transpose(1, 2)
