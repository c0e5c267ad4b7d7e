"""Qwen-Image 2.1 split across the mesh: its DiT calls over cfg and data ranks, its target tokens over Ulysses.

Design note. A 2.1 step is a list of DiT calls, each a prompt's rows against that prompt's (or the negative
prompt's) prefix K/V cache (pipeline21.py). `CallSplit` hands each rank its share of them and gives every rank
every call's output:
- cfg=2 with guidance: cfg rank 0 makes the positive calls, cfg rank 1 the negative ones, so each prefills and keeps
  only its branch's prefixes. Without guidance the cfg ranks share the rows as data ranks do.
- data: the rows of the batch (prompts x num_images) are cut into equal shares (the last row repeated to fill);
  a rank runs each call on the rows of its share that the call covers.
- ulysses (`ShardedDiT21`): the target's T tokens are sharded (padded to a multiple of the ranks), the prefix is
  not. Every rank prefills the whole prefix (block-causal, step-independent) and keeps its keys and values for its
  own heads only (1/u of the cache). In the target pass each block's q, k and v of the local target tokens go by
  one all-to-all to the ranks of their heads, which attend every target query over [their heads' prefix K/V;
  every target key] (ops/attention's prefix_attention) and send the output back the same way.
One all-gather over the world per step then lays every rank's (rows, tokens) piece in place. Ring attention is not
offered: the prefix attention would have to be merged across the ring; FP8 attention runs in the compute dtype
under Ulysses (the FP8 linears stay on).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..ops.attention import attention_override, prefix_attention
from .collectives import all_gather, start_heads_to_sequence, start_sequence_to_heads
from .degrees import check_qwen21_degrees  # noqa: F401  (the 2.1 pipeline's check, beside the rest of 2.1's)
from .layout import TokenLayout
from .mesh import ParallelMesh
from .rows import RowShare


class PrefixUlysses:
    """The attention of a sharded 2.1 target pass (ops/attention's override): Ulysses over the target tokens."""

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
        group, ulysses, num_target = self.mesh.group("ulysses"), self.layout.ulysses, self.layout.num_image
        stacked = torch.stack([query, key, value])  # (3, B, n, H, D): one all-to-all
        query, key, value = start_sequence_to_heads(stacked, group, ulysses, "ulysses all-to-all of q/k/v").result()
        with attention_override(None):  # every target token, padding dropped: the one-process call on our heads
            out = prefix_attention(query[:, :num_target], key[:, :num_target], value[:, :num_target], prefix_key,
                                   prefix_value)
        return start_heads_to_sequence(self.layout.pad(out, dim=1), group, ulysses).result()  # (B, n, H, D)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("a 2.1 target pass attends through prefix_attention only")


class ShardedDiT21:
    """The 2.1 DiT with its target tokens over the Ulysses ranks: `prefill` keeps this rank's heads, a call returns
    this rank's target chunk of the velocity (B, n, C); the whole DiT itself where there is no Ulysses."""

    def __init__(self, dit, mesh: ParallelMesh):
        self.dit, self.mesh = dit, mesh
        self.config = dit.config
        self.ulysses = mesh.degrees.ulysses
        self._overrides: dict[TokenLayout, PrefixUlysses] = {}

    def layout(self, num_target: int) -> TokenLayout:
        return TokenLayout(num_target, self.ulysses, 1, self.mesh.coordinate["ulysses"])

    def prefill(self, text_states, condition_tokens, layout, timestep=None):
        cache = self.dit.prefill(text_states, condition_tokens, layout, timestep)
        if self.ulysses == 1:
            return cache
        tokens = self.layout(layout.target.num_tokens)
        attention = self._override(tokens)
        # Our heads only, copied, so the whole tensors are freed.
        keys = [attention.heads(key).contiguous() for key in cache.keys]
        values = [attention.heads(value).contiguous() for value in cache.values]
        return replace(cache, keys=keys, values=values, target_rotation=tokens.local(cache.target_rotation, 0, 1))

    def _override(self, tokens: TokenLayout) -> PrefixUlysses:
        return self._overrides.setdefault(tokens, PrefixUlysses(self.mesh, tokens))

    def __call__(self, target_tokens: torch.Tensor, timestep: torch.Tensor, cache) -> torch.Tensor:
        if self.ulysses == 1:
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
        ulysses = self.mesh.degrees.ulysses
        grid = {branch: [[None] * ulysses for _ in range(groups)] for branch in all_branches}
        for rank in range(self.mesh.world_size):
            coordinate = self.mesh.coordinates_of(rank)
            branches, _, index = self._share(all_branches, coordinate)
            for position, branch in enumerate(branches):
                grid[branch][index][coordinate["ulysses"]] = gathered[rank, position]
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
