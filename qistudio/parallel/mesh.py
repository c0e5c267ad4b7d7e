"""The process group and device mesh of a parallel run: which rank this is, its coordinates and its groups.

Design note. One process per device. torch.distributed is the engine (NCCL on GPUs, gloo on the CPU); the mesh
is a torch DeviceMesh of shape (data, cfg, ring, ulysses) in that order, so Ulysses, whose all-to-all moves the
most bytes, takes consecutive ranks (one host, the fastest links). Every collective has the process group's
timeout: a rank that dies or stops answering ends the others with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .degrees import Degrees

MESH_DIMS = ("data", "cfg", "ring", "ulysses")  # outer to inner
DEFAULT_TIMEOUT_S = 300.0


def environment_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun (or qistudio's launcher) sets them; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def local_device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK where CUDA runs (one GPU per process; cuda:0 where each process
    sees only its own GPU, as schedulers that set CUDA_VISIBLE_DEVICES per process arrange), else the CPU."""
    if torch.cuda.is_available():
        local_rank = environment_world()[2]
        return torch.device("cuda", local_rank if local_rank < torch.cuda.device_count() else 0)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group (from torchrun's environment) unless one exists; one process alone needs none."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        wanted = backend_for(device)
        if wanted not in str(dist.get_backend()):
            raise RuntimeError(f"the process group runs {dist.get_backend()} but the pipeline's device {device} "
                               f"needs {wanted}; create the pipeline on this rank's device (qistudio.parallel."
                               "local_device())")
        return
    rank, world, _ = environment_world()
    timeout = datetime.timedelta(seconds=timeout_s)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        # A single process (degrees of 1): an in-memory store, no port.
        dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    dist.init_process_group(backend_for(device), rank=rank, world_size=world, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)


@dataclass
class ParallelMesh:
    """This rank's place in the mesh and the groups it talks in."""

    degrees: Degrees
    device_mesh: DeviceMesh
    rank: int
    coordinate: dict[str, int]  # per mesh dimension, this rank's index along it
    sequence_group: dist.ProcessGroup  # the ring x ulysses ranks sharing one image's tokens
    timeout_s: float

    def group(self, name: str) -> dist.ProcessGroup:
        return self.device_mesh.get_group(name)

    @property
    def world_size(self) -> int:
        return self.degrees.world_size

    @property
    def sequence_rank(self) -> int:
        """Which slice of the image tokens this rank holds: ring-major, ulysses-minor."""
        return self.coordinate["ring"] * self.degrees.ulysses + self.coordinate["ulysses"]

    @property
    def row_rank(self) -> int:
        """Which share of the batch rows this rank computes: cfg-major (cfg rank 0 the positive branch)."""
        return self.coordinate["cfg"] * self.degrees.data + self.coordinate["data"]

    @property
    def row_groups(self) -> int:
        return self.degrees.data * self.degrees.cfg

    def coordinates_of(self, rank: int) -> dict[str, int]:
        sizes = [getattr(self.degrees, name) for name in MESH_DIMS]
        coordinate = {}
        for name, size in zip(reversed(MESH_DIMS), reversed(sizes)):
            coordinate[name] = rank % size
            rank //= size
        return coordinate


def build_mesh(degrees: Degrees, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelMesh:
    """The mesh of `degrees` over the whole process group (every rank calls this, in the same order)."""
    if dist.get_world_size() != degrees.world_size:
        raise RuntimeError(f"{degrees.text()} needs {degrees.world_size} ranks but the process group has "
                           f"{dist.get_world_size()}")
    shape = tuple(getattr(degrees, name) for name in MESH_DIMS)
    device_mesh = init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)
    rank = dist.get_rank()
    mesh_coordinate = device_mesh.get_coordinate()
    coordinate = dict(zip(MESH_DIMS, mesh_coordinate))
    # The sequence group (ring x ulysses) of every (data, cfg) pair; new_group is collective, so every rank makes
    # all of them in the same order and keeps its own.
    sequence_group = None
    for outer in range(degrees.data * degrees.cfg):
        ranks = list(range(outer * degrees.sequence, (outer + 1) * degrees.sequence))
        group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s))
        if rank in ranks:
            sequence_group = group
    return ParallelMesh(degrees, device_mesh, rank, coordinate, sequence_group, timeout_s)
