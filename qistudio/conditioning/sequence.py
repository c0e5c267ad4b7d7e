"""Assemble what the DiT reads besides the noisy target: condition tokens, text, RoPE tables, masks.

Design note. A row of the batch is [target tokens | condition groups (edit images, ...) | text]. The target
grid is shared by the batch (one output size per call); condition groups may differ per row (batched edits of
images of different sizes). When every row has the same condition layout, one RoPE table serves the batch and
only text padding varies, which the attention handles by slicing. When layouts differ, each row gets its own
tables and shorter rows are zero-padded at the end of their image stream and masked out as keys; their padded
queries are computed and thrown away, so a row's result equals the row run alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.text_encoder import TextStates
from ..ops.packing import patchify
from ..ops.rope import ImageGrid, Rotary, image_positions, resampled_image_positions, rope_tables, text_offset, text_positions
from ..ops.split_attention import SplitMask
from .eligen import entity_mask_parts


@dataclass
class DiTSequence:
    """The fixed part of every denoising step for a batch of B rows."""

    num_target_tokens: int
    condition_tokens: torch.Tensor | None  # (B, Nc, 64) patchified condition latents, zero-padded per row
    text: TextStates  # (B, L, D)
    rotary: Rotary
    # (B, 1, 1, N + L) bool key mask when rows differ in layout; a SplitMask for EliGen's structure; else None.
    attention_mask: torch.Tensor | SplitMask | None
    condition_token_mask: torch.Tensor | None  # (N,) True on condition tokens, for zero_cond_t

    @property
    def text_lengths(self) -> list[int] | None:
        # With a key mask the text padding is masked too; otherwise the attention slices it away.
        return None if self.attention_mask is not None else self.text.lengths


def _segment_positions(offset: int, segments: list[int], length: int, device) -> torch.Tensor:
    """(length, 3) text positions where every segment restarts at `offset` (EliGen); padding continues the last."""
    parts = [text_positions(offset, n, device) for n in segments]
    used = sum(segments)
    if used < length:
        parts.append(text_positions(offset + (segments[-1] if segments else 0), length - used, device))
    return torch.cat(parts)


def _row_positions(target: ImageGrid, grids: list[ImageGrid], rope_interpolation: bool, device) -> torch.Tensor:
    """(N_row, 3) positions of the target then each condition group of one row."""
    parts = [image_positions(target, device)]
    for grid in grids:
        if rope_interpolation and (grid.height, grid.width) != (target.height, target.width):
            parts.append(resampled_image_positions(grid, target, device))
        else:
            parts.append(image_positions(grid, device))
    return torch.cat(parts)


def build_sequence(
    target: ImageGrid,
    conditions: list[list[torch.Tensor]],
    text: TextStates,
    axes_dim: tuple[int, ...],
    rope_interpolation: bool = False,
    zero_cond_t: bool = False,
    entity_token_masks: torch.Tensor | None = None,
) -> DiTSequence:
    """Lay out a batch: `conditions[r]` are row r's condition latents, each (16, h, w), given frames 1, 2, ...

    rope_interpolation: condition groups whose size differs from the target take their spatial positions from
    the target grid (Edit-Lowres-Fix), so a small edit image spans the whole output.
    entity_token_masks (N, target tokens): EliGen regions of the entity segments in `text.segments`; rows with
    segments get a structured attention mask and text positions that restart at the offset for each segment.
    """
    device = text.states.device
    batch, text_length = text.states.shape[:2]
    if len(conditions) != batch:
        raise ValueError(f"{len(conditions)} rows of condition images for {batch} rows of text")
    row_grids = [
        [ImageGrid(k + 1, lat.shape[-2] // 2, lat.shape[-1] // 2) for k, lat in enumerate(row)] for row in conditions
    ]
    layouts = {tuple((g.height, g.width) for g in grids) for grids in row_grids}
    shared = len(layouts) == 1

    rows_positions = [_row_positions(target, grids, rope_interpolation, device) for grids in row_grids]
    offsets = [text_offset([target, *grids]) for grids in row_grids]
    eligen = text.segments is not None
    if eligen:
        text_tables = torch.stack([
            rope_tables(_segment_positions(offset, segs, text_length, device), axes_dim)
            for offset, segs in zip(offsets, text.row_segments())
        ])  # fmt: skip
    if shared:
        rotary = Rotary(
            rope_tables(rows_positions[0], axes_dim),
            text_tables if eligen else rope_tables(text_positions(offsets[0], text_length, device), axes_dim),
        )
    else:
        width = max(p.shape[0] for p in rows_positions)
        padded = [torch.nn.functional.pad(p, (0, 0, 0, width - p.shape[0])) for p in rows_positions]
        rotary = Rotary(
            torch.stack([rope_tables(p, axes_dim) for p in padded]),
            text_tables if eligen else torch.stack([
                rope_tables(text_positions(o, text_length, device), axes_dim) for o in offsets
            ]),
        )  # fmt: skip

    num_target = target.num_tokens
    condition_tokens = None
    counts = [sum(lat.shape[-2] * lat.shape[-1] // 4 for lat in row) for row in conditions]
    if max(counts) > 0:
        condition_tokens = text.states.new_zeros(batch, max(counts), 64)
        for r, row in enumerate(conditions):
            if row:
                tokens = torch.cat([patchify(lat[None].to(device)) for lat in row], dim=1)[0]  # (n_r, 64)
                condition_tokens[r, : tokens.shape[0]] = tokens.to(condition_tokens.dtype)

    attention_mask = None
    if eligen:
        if max(counts) > 0:
            raise ValueError("EliGen entities with condition images (edit, context) are not supported")
        parts = [entity_mask_parts(num_target, num_target, text_length, segs, entity_token_masks, device)
                 for segs in text.row_segments()]
        attention_mask = SplitMask(num_target, torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    elif not shared:
        image_valid = torch.arange(num_target + max(counts), device=device)[None] < (
            num_target + torch.tensor(counts, device=device)[:, None]
        )
        attention_mask = torch.cat([image_valid, text.mask], dim=1)[:, None, None, :]  # (B, 1, 1, N + L)

    condition_token_mask = None
    if zero_cond_t and condition_tokens is not None:
        condition_token_mask = torch.arange(num_target + condition_tokens.shape[1], device=device) >= num_target
    return DiTSequence(num_target, condition_tokens, text, rotary, attention_mask, condition_token_mask)
