"""Qwen-Image 2.1 split across the mesh: its DiT calls over cfg and data ranks, its target tokens over ring x Ulysses.

Design note. A 2.1 step is a list of DiT calls, each a prompt's rows against that prompt's (or the negative
prompt's) prefix K/V cache (pipeline21.py). `CallSplit` hands each rank its share of them and gives every rank
every call's output:
- cfg=2 with guidance: cfg rank 0 makes the positive calls, cfg rank 1 the negative ones, so each prefills and keeps
  only its branch's prefixes. Without guidance the cfg ranks share the rows as data ranks do.
- data: the rows of the batch (prompts x num_images) are cut into equal shares (the last row repeated to fill);
  a rank runs each call on the rows of its share that the call covers.
- ring x ulysses (`ShardedDiT21`): the target's T tokens are sharded as TokenLayout lays out the 20B model's image
  (padded at the end to a multiple of the ranks; ring-major, Ulysses-minor), the prefix is not. Every rank prefills
  the whole prefix (block-causal, step-independent: once per prompt) and keeps its keys and values for its own
  Ulysses heads only (1/u of the cache; all heads without Ulysses). In the target pass each block's q, k and v of
  the local target tokens go by one all-to-all to the Ulysses ranks of their heads (`PrefixAttention21`), which
  then hold their ring position's chunk of the target. Without ring they attend every target query over [their
  heads' prefix K/V; every target key] (ops/attention's prefix_attention). With ring the target's keys and values
  travel around the ring (ring.py's RingShift) and the softmax is split over disjoint key sets, one partial each:
  the prefix (local, computed while the first chunk travels) and every ring chunk's valid target keys (a chunk's
  padding is sliced off, as the 20B ring does), merged exactly by their log-sum-exps (ring.py's partial_attention
  and merge). There are no masks: the 2.1 target sees everything. The merge runs in arrival order, fixed for a
  given rank; unlike the 20B model's replicated text stream, no token is computed on two ranks, so the ranks never
  need each other's rounding. The output goes back by the inverse all-to-all.
One all-gather over the world per step then lays every rank's (rows, tokens) piece in place. FP8 attention runs in
the compute dtype under sequence parallelism (the FP8 linears stay on).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..ops.attention import attention_override, prefix_attention
from .collectives import RingShift, all_gather, start_heads_to_sequence, start_sequence_to_heads
from .layout import TokenLayout
from .mesh import ParallelMesh
from .ring import Partial, merge, partial_attention
from .rows import RowShare


class PrefixAttention21:
    """The attention of a sharded 2.1 target pass (ops/attention's override): Ulysses within a ring position, ring
    across them."""

    takes_fp8 = False  # its attention runs in the compute dtype
    streams = False

    def __init__(self, mesh: ParallelMesh, layout: TokenLayout):
        self.mesh, self.layout = mesh, layout

    def heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """The heads of this rank of a (B, S, H, D) tensor."""
        count = tensor.shape[2] // self.layout.ulysses
        first = self.mesh.coordinate["ulysses"] * count
        return tensor[:, :, first : first + count]

    def prefix_attention(self, query, key, value, prefix_key, prefix_value):
        """query, key, value (B, n, H, D) of this rank's target chunk; prefix (B|1, P, H / u, D) of its heads."""
        layout, ulysses = self.layout, self.layout.ulysses
        if ulysses > 1:  # (3, B, n, H, D) -> (3, B, u n, H / u, D): this ring position's tokens, our heads
            stacked = torch.stack([query, key, value])  # one all-to-all
            query, key, value = start_sequence_to_heads(stacked, self.mesh.group("ulysses"), ulysses,
                                                        "ulysses all-to-all of q/k/v").result()
        if layout.ring == 1:
            num_target = layout.num_image
            with attention_override(None):  # every target token, padding dropped: the one-process call on our heads
                out = layout.pad(prefix_attention(query[:, :num_target], key[:, :num_target], value[:, :num_target],
                                                  prefix_key, prefix_value), dim=1)
        else:
            out = ring_prefix_attention(query, torch.stack([key, value]), (prefix_key, prefix_value), layout,
                                        self.mesh.group("ring"), self.mesh.coordinate["ring"])
        if ulysses > 1:
            out = start_heads_to_sequence(out, self.mesh.group("ulysses"), ulysses).result()
        return out  # (B, n, H, D)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("a 2.1 target pass attends through prefix_attention only")


def ring_prefix_attention(query: torch.Tensor, target: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor],
                          layout: TokenLayout, group, ring_rank: int) -> torch.Tensor:
    """query (B, C, h, D) of this rank's ring chunk (C = layout.ring_chunk tokens, padding included), target: its k
    and v stacked (2, B, C, h, D), prefix: this rank's heads' prefix k and v (B|1, P, h, D). Returns (B, C, h, D):
    every query attending over [the prefix; every valid target key of every ring chunk]."""
    dtype, ring_size = query.dtype, layout.ring
    query = query.transpose(1, 2)  # (B, h, C, D)
    total: Partial | None = None
    current, owner = target, ring_rank  # the chunk in hand and whose it is
    for step in range(ring_size):
        shift = RingShift(current, group, ring_size, "ring K/V pass of the 2.1 target") if step < ring_size - 1 \
            else None
        valid = layout.valid_in_ring_chunk(owner)
        if valid:
            key, value = (t[:, :valid].transpose(1, 2) for t in current)
            total = merge(total, partial_attention(query, key, value, None))
        if step == 0:  # the prefix is local: its partial computes while the first chunk travels
            total = merge(total, _prefix_partial(query, *prefix))
        if shift is not None:
            current, owner = shift.result(), (owner - 1) % ring_size
    return total[0].transpose(1, 2).to(dtype)


def _prefix_partial(query: torch.Tensor, prefix_key: torch.Tensor, prefix_value: torch.Tensor) -> Partial:
    """partial_attention of query (B, h, C, D) over the prefix (B|1, P, h, D). A prefix shared by the rows (batch 1)
    is not copied per row: the rows' queries are one longer sequence over it (attention is per query row)."""
    batch, heads, chunk, dim = query.shape
    key, value = (t.transpose(1, 2) for t in (prefix_key, prefix_value))  # (B|1, h, P, D)
    if key.shape[0] == batch:
        return partial_attention(query, key, value, None)
    rows = query.transpose(0, 1).reshape(1, heads, batch * chunk, dim)
    out, lse = partial_attention(rows, key, value, None)
    return (out.reshape(heads, batch, chunk, dim).transpose(0, 1),
            lse.reshape(heads, batch, chunk).transpose(0, 1))


class ShardedDiT21:
    """The 2.1 DiT with its target tokens over the sequence (ring x Ulysses) ranks: `prefill` keeps this rank's
    heads, a call returns this rank's target chunk of the velocity (B, n, C); the whole DiT itself where no rank
    shares the tokens."""

    def __init__(self, dit, mesh: ParallelMesh):
        self.dit, self.mesh = dit, mesh
        self.config = dit.config
        self.ulysses, self.ring = mesh.degrees.ulysses, mesh.degrees.ring
        self.sharded = mesh.degrees.sequence > 1
        self._overrides: dict[TokenLayout, PrefixAttention21] = {}

    def layout(self, num_target: int) -> TokenLayout:
        return TokenLayout(num_target, self.ulysses, self.ring, self.mesh.sequence_rank)

    def prefill(self, text_states, condition_tokens, layout, timestep=None):
        cache = self.dit.prefill(text_states, condition_tokens, layout, timestep)
        if not self.sharded:
            return cache
        tokens = self.layout(layout.target.num_tokens)
        keys, values = cache.keys, cache.values
        if self.ulysses > 1:  # our heads only, copied, so the whole tensors are freed
            attention = self._override(tokens)
            keys = [attention.heads(key).contiguous() for key in keys]
            values = [attention.heads(value).contiguous() for value in values]
        return replace(cache, keys=keys, values=values, target_rotation=tokens.local(cache.target_rotation, 0, 1))

    def _override(self, tokens: TokenLayout) -> PrefixAttention21:
        return self._overrides.setdefault(tokens, PrefixAttention21(self.mesh, tokens))

    def __call__(self, target_tokens: torch.Tensor, timestep: torch.Tensor, cache) -> torch.Tensor:
        if not self.sharded:
            return self.dit(target_tokens, timestep, cache)
        tokens = self.layout(target_tokens.shape[1])
        with attention_override(self._override(tokens)):
            return self.dit(tokens.local(target_tokens, 1), timestep, cache)


@dataclass(frozen=True)
class Call:
    """One DiT call of a step: guidance branch 0 (positive) or 1 (negative), the batch rows it covers, and
    fn(target_tokens, timestep) for those rows (or any subset) -> velocity (rows, tokens, C)."""

    branch: int
    rows: slice
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CallSplit:
    """Runs this rank's share of a step's calls and returns every call's whole output, on every rank."""

    def __init__(self, mesh: ParallelMesh, sharded: ShardedDiT21):
        self.mesh, self.sharded = mesh, sharded

    def _share(self, branches: list[int], coordinate: dict[str, int]) -> tuple[list[int], int, int]:
        """(the branches, row share count, row share index) of a rank at `coordinate`."""
        degrees = self.mesh.degrees
        if degrees.cfg == 2 and len(branches) == 2:  # one branch per cfg rank, rows over the data ranks
            return [branches[coordinate["cfg"]]], degrees.data, coordinate["data"]
        return branches, degrees.data * degrees.cfg, coordinate["cfg"] * degrees.data + coordinate["data"]

    def __call__(self, calls: list[Call], target_tokens: torch.Tensor, timestep: torch.Tensor) -> list[torch.Tensor]:
        total, num_target = target_tokens.shape[:2]
        all_branches = sorted({call.branch for call in calls})
        branches, groups, index = self._share(all_branches, self.mesh.coordinate)
        rows = RowShare(total, groups, index, target_tokens.device)
        pieces = []
        for branch in branches:
            parts = []
            for call in (c for c in calls if c.branch == branch):
                mine = [row for row in rows.indices if call.rows.start <= row < call.rows.stop]
                if mine:  # rows.indices ascend: the calls' parts land in share order
                    picked = torch.tensor(mine, device=target_tokens.device)
                    parts.append(call.fn(target_tokens[picked], timestep[picked]))
            pieces.append(torch.cat(parts))  # (rows of the share, this rank's tokens, C)
        local = torch.stack(pieces)  # (branches here, rows, tokens, C)
        gathered = all_gather(local, torch.distributed.group.WORLD, "gather of the DiT outputs")
        whole = self._lay_out(gathered, all_branches, groups)  # {branch: (rows of every share, T padded, C)}
        return [whole[call.branch][call.rows, :num_target] for call in calls]

    def _lay_out(self, gathered: torch.Tensor, all_branches: list[int], groups: int) -> dict[int, torch.Tensor]:
        degrees = self.mesh.degrees
        grid = {branch: [[None] * degrees.sequence for _ in range(groups)] for branch in all_branches}
        for rank in range(self.mesh.world_size):
            coordinate = self.mesh.coordinates_of(rank)
            branches, _, index = self._share(all_branches, coordinate)
            chunk = coordinate["ring"] * degrees.ulysses + coordinate["ulysses"]  # TokenLayout's sequence rank
            for position, branch in enumerate(branches):
                grid[branch][index][chunk] = gathered[rank, position]
        return {branch: torch.cat([torch.cat(share, dim=1) for share in shares]) for branch, shares in grid.items()}


def encode_once21(runtime, encode, make):
    """`encode()` -> (prompt prefixes, the negative prompt's or None), run on rank 0 only; each prefix's text states
    (1, L, D) and runs (text lengths and ImageBlocks) broadcast to every rank, rebuilt by make(text_states, runs)."""
    from ..models.layout21 import ImageBlock

    if runtime.mesh.world_size == 1:
        return encode()

    def produce():
        positives, negative = encode()
        return [*positives, negative]

    received = runtime.broadcast_once(produce, lambda prefix: (prefix.text_states, [
        run if isinstance(run, int) else [run.height, run.width] for run in prefix.runs]), "text states broadcast")
    prefixes = [None if item is None else make(item[0], tuple(run if isinstance(run, int) else ImageBlock(*run)
                                                              for run in item[1])) for item in received]
    return prefixes[:-1], prefixes[-1]
