"""The interleaved text/image sequence of Qwen-Image 2.1: its layout and the 3-axis RoPE positions it implies.

Qwen-Image 2.1's DiT reads one sequence: the text encoder's states with each condition image's latent tokens
standing where the encoder reserved that image's vision slots, then the target image last. The prefix (everything
before the target) is block-causal; the target attends to all of it. This file describes that sequence
geometrically, with no weights: which runs are text, which are image blocks of which grid, and where each token sits
on the (frame, height, width) RoPE axes.

Positions, as the reference (diffusers' QwenImage21Rope) lays them out: a cursor walks the sequence; each text token
takes the cursor on all three axes and advances it by one; an image block of h x w tokens freezes the frame axis at
the cursor, lays its tokens on a centred grid (rows -(h - h//2) .. h//2 - 1, same for columns) and advances the
cursor by max(h, w). So a block's spatial positions do not depend on where it sits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageBlock:
    """One image's latent tokens on an h x w grid (row-major), one token per 16x16 pixels."""

    height: int
    width: int

    @property
    def num_tokens(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class JointLayout:
    """prefix: runs in sequence order, an int for that many text tokens, an ImageBlock for a condition image;
    target: the generated image, always last."""

    prefix: tuple[int | ImageBlock, ...]
    target: ImageBlock

    def __post_init__(self):
        for run in self.prefix:
            if not (isinstance(run, ImageBlock) or (type(run) is int and run > 0)):
                raise ValueError(f"a layout run must be a positive text length or an ImageBlock, got {run!r}")

    @property
    def prefix_length(self) -> int:
        return sum(run.num_tokens if isinstance(run, ImageBlock) else run for run in self.prefix)

    @property
    def num_text_tokens(self) -> int:
        return sum(run for run in self.prefix if not isinstance(run, ImageBlock))

    @property
    def condition_blocks(self) -> list[ImageBlock]:
        return [run for run in self.prefix if isinstance(run, ImageBlock)]

    def segments(self) -> list[tuple[int, int, bool]]:
        """The prefix as (start, end, is_text) spans: what block-causal attention iterates over."""
        spans, start = [], 0
        for run in self.prefix:
            length = run.num_tokens if isinstance(run, ImageBlock) else run
            spans.append((start, start + length, not isinstance(run, ImageBlock)))
            start += length
        return spans


def _centred(n: int) -> torch.Tensor:
    return torch.arange(-(n - n // 2), n // 2)


def _block_positions(block: ImageBlock, frame: int) -> torch.Tensor:
    rows = _centred(block.height)[:, None].expand(-1, block.width)
    cols = _centred(block.width)[None, :].expand(block.height, -1)
    return torch.stack([torch.full_like(rows, frame), rows, cols], dim=-1).reshape(-1, 3)


def joint_positions(layout: JointLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix (P, 3), target (T, 3)) integer positions on the (frame, height, width) axes."""
    pieces, cursor = [], 0
    for run in layout.prefix:
        if isinstance(run, ImageBlock):
            pieces.append(_block_positions(run, cursor))
            cursor += max(run.height, run.width)
        else:
            pieces.append(torch.arange(cursor, cursor + run)[:, None].expand(-1, 3))
            cursor += run
    return torch.cat(pieces), _block_positions(layout.target, cursor)
