"""A DiT forward split across the mesh: batch rows over data x cfg, image tokens over ring x ulysses, joined after.

Design note. `ShardedDiT` takes the DiT's own arguments, gives each rank its share and calls the unchanged DiT:
- Rows: the B rows of the call (2B with both guidance branches batched: positive rows, then negative) are cut
  into data x cfg equal shares, cfg-major, so with cfg=2 one rank group runs the positive branch and the other the
  negative. A count that does not divide is padded by repeating the last row (computed, then dropped).
- Tokens: each sequence rank keeps its chunk of image tokens (layout.py) with the matching RoPE rows and
  zero-cond-t flags; the text stays whole. Attention joins the chunks (attention.py).
- A ControlNet's block hook sees the whole image of its rows (an all-gather over the sequence ranks per block)
  and each rank keeps its chunk of what it returns. Its rows must be whole guidance branches (an InstantX
  ControlNet adds one sample per prompt row to each branch): where a share is not (data parallelism, or cfg=2
  without guidance), the hook sees every row (gathered from every rank) and each rank keeps its own.
- A step cache's block gate sees this rank's share and decides over the whole call (cache.py).
- Output: every rank's (rows, tokens) piece is all-gathered and laid back in place, so every rank ends with the
  velocity of the whole batch, as one process computes it, and the sampler runs identically everywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.attention import attention_override
from ..ops.rope import Rotary
from .attention import SequenceParallelAttention
from .cache import shard_gate
from .collectives import all_gather, lost_peer
from .degrees import ParallelConfigError
from .layout import TokenLayout
from .mesh import ParallelMesh
from .rows import RowShare


def _compiled(dit) -> bool:
    blocks = getattr(dit, "transformer_blocks", None)
    return bool(blocks) and getattr(blocks[0], "_compiled_call_impl", None) is not None


class ShardedDiT:
    """Calls `dit` on this rank's share of the call and returns the whole call's output, like `dit` itself."""

    def __init__(self, dit, mesh: ParallelMesh):
        self.dit, self.mesh = dit, mesh
        self.config = dit.config
        # One attention override per token layout, kept: compiled blocks guard on its identity (a new object per
        # call would recompile them every step).
        self._overrides: dict[TokenLayout, SequenceParallelAttention] = {}
        self.branch_rows: int | None = None  # rows of one guidance branch (the images of the call), if known
        self._rows: dict[tuple, RowShare] = {}

    def __call__(self, image_tokens, text_states, timestep, rotary: Rotary, text_lengths=None,
                 num_target_tokens=None, condition_token_mask=None, additional_t_cond=None, attention_mask=None,
                 block_hook=None, block_gate=None) -> torch.Tensor:
        mesh, degrees = self.mesh, self.mesh.degrees
        num_target = image_tokens.shape[1] if num_target_tokens is None else num_target_tokens
        key = (image_tokens.shape[0], image_tokens.device)
        if key not in self._rows:  # its index tensor made once, not copied to the device every step
            self._rows[key] = RowShare(image_tokens.shape[0], mesh.row_groups, mesh.row_rank, image_tokens.device)
        rows = self._rows[key]
        layout = TokenLayout(image_tokens.shape[1], degrees.ulysses, degrees.ring, mesh.sequence_rank)
        sharded = layout.ranks > 1
        if sharded and attention_mask is not None and _compiled(self.dit):
            raise ParallelConfigError("masked attention (EliGen entities, edit rows of different layouts) in compiled "
                                      "blocks does not run sequence-parallel yet (the DiT turns the whole sequence's "
                                      "mask into a FlexAttention mask): drop pipe.compile() or use cfg/data "
                                      "parallelism alone")
        if condition_token_mask is not None and sharded:
            condition_token_mask = layout.local(condition_token_mask, 0, False)
        local_rotary = Rotary(rows.take_table(rotary.image), rows.take_table(rotary.text))
        if sharded:
            local_rotary = Rotary(layout.local(local_rotary.image, -2, 1), local_rotary.text)
        block_gate = shard_gate(block_gate, rows, layout)  # a step cache deciding alike on every rank
        override = None
        if sharded:
            override = self._overrides.setdefault(layout, SequenceParallelAttention(mesh, layout))
        try:
            with attention_override(override):
                out = self.dit(
                    layout.local(rows.take(image_tokens), 1) if sharded else rows.take(image_tokens),
                    rows.take(text_states), rows.take(timestep), local_rotary, rows.take(text_lengths),
                    num_target_tokens=None if sharded else num_target, condition_token_mask=condition_token_mask,
                    additional_t_cond=rows.take(additional_t_cond), attention_mask=rows.take(attention_mask),
                    block_hook=self._shared_hook(block_hook, rows, layout), block_gate=block_gate,
                )  # (rows of this share, image tokens of this rank, out channels)
        except (RuntimeError, dist.DistError) as error:
            converted = lost_peer(error, "a collective inside the DiT")
            if converted is None:
                raise
            raise converted from None
        return self._gather(out, rows, layout)[: rows.total, :num_target]

    def _gather(self, out: torch.Tensor, rows: RowShare, layout: TokenLayout) -> torch.Tensor:
        """Every rank's piece of the output laid back in place: (row shares x rows, sequence ranks x tokens)."""
        mesh = self.mesh
        if mesh.world_size == 1:
            return out
        pieces = all_gather(out, dist.group.WORLD, "gather of the DiT output")  # (world, rows, tokens, C)
        grid = [[None] * layout.ranks for _ in range(rows.groups)]
        for rank in range(mesh.world_size):
            coordinate = mesh.coordinates_of(rank)
            row_rank = coordinate["cfg"] * mesh.degrees.data + coordinate["data"]
            grid[row_rank][coordinate["ring"] * layout.ulysses + coordinate["ulysses"]] = pieces[rank]
        return torch.cat([torch.cat(share, dim=1) for share in grid], dim=0)

    def _shared_hook(self, hook, rows: RowShare, layout: TokenLayout):
        """The block hook over the whole image of whole guidance branches, each rank keeping its share after."""
        whole_rows = rows.groups == 1 or bool(self.branch_rows and rows.per_group % self.branch_rows == 0)
        if hook is None or (whole_rows and layout.ranks == 1):
            return hook
        group = self.mesh.sequence_group

        def shared_hook(index: int, image: torch.Tensor) -> torch.Tensor:
            if whole_rows:  # (P, rows, chunk, D) from the sequence ranks
                whole = all_gather(image, group, "ControlNet hook gather").movedim(0, 1).flatten(1, 2)
            else:
                whole = self._gather(image, rows, layout)[: rows.total]
            with attention_override(None):
                whole = hook(index, whole[:, : layout.num_image])
            return layout.local(whole if whole_rows else rows.take(whole), 1)

        return shared_hook
