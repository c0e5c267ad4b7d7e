"""What a parallel pipeline asks of the mesh: text encoded once and broadcast, a sharded DiT, the decode on rank 0.

Every rank runs the same generation; this object decides the few places where ranks differ. It knows no
pipeline: the pipeline hands it callables (encode, decode) and its DiT.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..models.text_encoder import TextStates
from .collectives import all_reduce_sum, broadcast, broadcast_json
from .degrees import Degrees, ParallelConfigError, auto_degrees, resolve_degrees
from .mesh import DEFAULT_TIMEOUT_S, ParallelMesh, build_mesh, environment_world, init_distributed, local_device
from .shard import ShardedDiT


class ParallelRuntime:
    """meshes: the layout for calls with guidance (True) and without (False); the same one unless "auto" chose
    (a call without guidance has no second branch for a cfg group to run)."""

    def __init__(self, meshes: dict[bool, ParallelMesh], device: torch.device):
        self.meshes, self.device = meshes, device
        self.mesh = meshes[True]  # the current call's
        self._sharded: dict[tuple, ShardedDiT] = {}  # kept across calls (see ShardedDiT's overrides)
        self.branch_rows: int | None = None  # the last prepared call's images (rows of one guidance branch)

    @property
    def degrees(self) -> Degrees:
        return self.mesh.degrees

    @property
    def rank(self) -> int:
        return self.mesh.rank

    @property
    def is_main(self) -> bool:
        return self.mesh.rank == 0

    def prepare(self, request) -> None:
        """Lay the call out on the mesh (its guidance branches over the cfg ranks); quiet progress bars off rank 0."""
        self.mesh = self.meshes[bool(request.use_cfg)]
        if self.degrees.cfg > 1 and request.use_cfg:
            request.cfg_batch = True  # the cfg ranks split the batched call's rows: one branch each
        elif self.degrees.cfg > 1:
            _warn_once(f"{self.degrees.text()}: this call has no guidance, so the cfg=2 groups share its images "
                       "(or compute the same one twice); enable_parallelism('auto') lays such calls out over "
                       "ulysses and ring instead")
        self.branch_rows = request.batch_size
        request.seed = self.broadcast_seed(request.seed)  # seed=None draws one per process: rank 0's noise for all
        if not self.is_main:
            request.progress_bar_cmd = lambda steps: steps

    def encode_once(self, encode) -> tuple[TextStates, TextStates | None]:
        """`encode()` -> (positive, negative) run on rank 0 only, its states broadcast to every rank."""
        if self.mesh.world_size == 1:
            return encode()
        received = self.broadcast_once(lambda: list(encode()), lambda s: (
            s.states, {"lengths": list(s.lengths), "segments": s.segments}), "text states broadcast")
        return tuple(None if item is None else TextStates(item[0], item[1]["lengths"], item[1]["segments"])
                     for item in received)

    def broadcast_once(self, produce, pack, what: str) -> list:
        """`produce()` -> a list of objects (or None) run on rank 0 only; `pack(object)` -> (tensor, JSON-able
        facts). Every rank gets the list as (tensor, facts) pairs (None where rank 0's was None)."""
        packed = [None if item is None else pack(item) for item in produce()] if self.is_main else None
        header = None if packed is None else [None if item is None else {
            "shape": list(item[0].shape), "dtype": str(item[0].dtype).removeprefix("torch."), "facts": item[1]}
            for item in packed]
        received = []
        for index, info in enumerate(broadcast_json(header, what, self.device)):
            if info is None:
                received.append(None)
                continue
            if self.is_main:
                tensor = packed[index][0].contiguous()
            else:
                tensor = torch.empty(info["shape"], dtype=getattr(torch, info["dtype"]), device=self.device)
            received.append((broadcast(tensor, what), info["facts"]))
        return received

    def broadcast_value(self, value, what: str):
        """Rank 0's JSON-able `value` (a caption, a seed) on every rank."""
        return value if self.mesh.world_size == 1 else broadcast_json(value, what, self.device)

    def dit(self, dit) -> ShardedDiT:
        """The DiT as the velocity function calls it, split across the mesh."""
        if self.degrees.ring > 1 and any(getattr(m, "fp8_attention", False) for m in dit.modules()):
            _warn_once("FP8 attention does not run under ring attention (the FP8 linears do): the ring layouts run "
                       "the compute-dtype attention; Ulysses alone keeps FP8 attention")
        sharded = self._sharded.setdefault((dit, self.degrees), ShardedDiT(dit, self.mesh))
        sharded.branch_rows = self.branch_rows
        return sharded

    def qwen21(self, dit, use_cfg: bool):
        """A Qwen-Image 2.1 call laid out on the mesh (its guidance branches over the cfg ranks): the DiT split over
        the ring x Ulysses ranks (parallel/qwen21.py ShardedDiT21) and the step's calls over the rest (CallSplit)."""
        from .qwen21 import CallSplit, ShardedDiT21

        self.mesh = self.meshes[bool(use_cfg)]
        sharded = self._sharded.setdefault((dit, self.degrees), ShardedDiT21(dit, self.mesh))
        return sharded, CallSplit(self.mesh, sharded)

    def decode(self, decode, latents: torch.Tensor, tiled: bool):
        """`decode(latents, share)`: rank 0's images, None on every other rank. Tiled, every rank decodes its share
        of the tiles (round robin) and rank 0 blends the sum; else rank 0 decodes alone (untiled decoding is one
        convolution stack over the whole image: it does not split without changing the image)."""
        if not tiled or self.mesh.world_size == 1:
            return decode(latents, None) if self.is_main else None
        return decode(latents, TileShare(self.rank, self.mesh.world_size, self.is_main))

    def broadcast_seed(self, seed: int) -> int:
        """Rank 0's seed on every rank (a random seed drawn per process would differ)."""
        return int(broadcast_json(seed, "seed broadcast", self.device))

    def barrier(self) -> None:
        if self.mesh.world_size > 1:
            dist.barrier()


@dataclass(frozen=True)
class TileShare:
    """The VAE tiles of one rank (tile k where k % count == index) and how the partial canvases meet."""

    index: int
    count: int
    keeps: bool  # whether this rank keeps the sum

    def reduce(self, canvas: torch.Tensor) -> torch.Tensor | None:
        total = all_reduce_sum(canvas, "VAE tiles sum")
        return total if self.keeps else None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def enable_parallelism(device, num_heads: int, degrees=None, timeout_s: float = DEFAULT_TIMEOUT_S,
                       check=None) -> ParallelRuntime:
    """Join the process group (torchrun's environment) and build the mesh of `degrees` for a DiT of `num_heads`
    heads. Every rank calls this, with the same degrees. Raises ParallelConfigError for degrees that cannot run,
    or that `check(Degrees)` (the model's own limits) refuses, before joining any process group."""
    device = torch.device(device)
    rank, world, local_rank = environment_world()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if world > 1 and index != local_device().index:
            raise ParallelConfigError(f"rank {rank} (LOCAL_RANK {local_rank}) has its pipeline on cuda:{index}; load "
                                      "each rank's pipeline on its own GPU: device=qistudio.parallel.local_device()")
        device = torch.device("cuda", index)
    if not dist.is_initialized():
        _layouts(degrees, world, num_heads, check)  # bad degrees: one error before any process group exists
    init_distributed(device, timeout_s)
    layouts = _layouts(degrees, dist.get_world_size(), num_heads, check)
    meshes = {}
    for guidance, resolved in layouts.items():
        key = (dist.group.WORLD, resolved, device, timeout_s)
        if key not in _meshes:  # a mesh's process groups are made once per process group: every rank asks alike
            _meshes[key] = build_mesh(resolved, device, timeout_s)
        meshes[guidance] = _meshes[key]
    return ParallelRuntime(meshes, device)


def _layouts(degrees, world: int, num_heads: int, check) -> dict[bool, Degrees]:
    """The degrees for calls with guidance (True) and without (False), each checked."""
    layouts = {True: resolve_degrees(degrees, world, num_heads)}
    layouts[False] = auto_degrees(world, num_heads, guidance=False) if degrees in (None, "auto") else layouts[True]
    for resolved in layouts.values():
        if check is not None:
            check(resolved)
    return layouts


_meshes: dict[tuple, ParallelMesh] = {}
