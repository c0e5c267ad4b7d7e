"""Resume checkpoints: everything a killed run needs to continue as if it had never stopped, written atomically.

Design note. A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
  weights.safetensors             the trainable tensors, exactly as trained (LoRA factors in float32, or the DiT)
  optimizer.safetensors           optimizer and LR-scheduler state
  optimizer-rank{R}.safetensors   the optimizer part instead, when the optimizer is partitioned across processes
                                  (DeepSpeed): each process's own shard, resumable only with as many processes;
                                  under ZeRO-1/2/3 its slice of every parameter's state (zero_state.py), resumable
                                  with any number of processes and under any of those stages
  rng-rank{R}.safetensors         each process's random states: torch, CUDA and Python
  sharded/                        instead of weights.safetensors and the optimizer's tensors, under FSDP2: every
                                  process's shards of the DiT and its optimizer state (sharded_checkpoint.py),
                                  resumable with any number of processes
  state.json                      step, epoch, position in the epoch's order, skipped samples, the run's config
Nothing is pickled: the state files are tree.py's safetensors (tensors, and a JSON tree of the numbers, lists and
dicts around them in the header), and the only classes they may name are DeepSpeed's few (DEEPSPEED_CLASSES), so a
crafted checkpoint folder can hold wrong numbers but cannot run code. Files of format 1 (pickled .pt) are refused,
never opened.

It is assembled in a hidden `.step-NNNNNNNN.partial` folder and renamed into place only when every file is
written, then `checkpoints/latest` is replaced (write + rename) to name it. A failure at any point (a full disk,
a kill) leaves the previous checkpoint and `latest` as they were; older checkpoints are deleted only after a newer
one is complete. Readers trust a folder only if `latest` names it or it has its state.json (written last).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointSaveError
from .outputs import write_text_atomic
from .sharded_checkpoint import SHARDED
from .tree import read_tree, write_tree

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.json"
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
FORMAT_VERSION = 2  # 1: optimizer and random states as pickled .pt files (never read since)
BY_PARAMETER = "by_parameter"  # partitioned_optimizer's value when each process saved its slice of every parameter
BY_PARAMETER_FILES = "by_parameter_files"  # the optimizer state handed on for that: the files of every process
# The objects of DeepSpeed's ZeRO / bf16 optimizer state dicts besides tensors, numbers and containers: its loss
# scalers, its stage enum and the fragment addresses of its parameter slice mappings.
DEEPSPEED_CLASSES = frozenset({
    "deepspeed.runtime.fp16.loss_scaler:LossScaler", "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.runtime.zero.config:ZeroStageEnum", "deepspeed.utils.tensor_fragment:fragment_address",
})


def _state_class(name: str) -> bool:
    return name in DEEPSPEED_CLASSES


def _save_state(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """One state file inside the partial folder (atomic as a whole): host tensors, a copy only where two share
    storage (safetensors refuses that)."""
    seen, owned = set(), {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        owned[name] = tensor
    save_file(owned, str(path), metadata)


@dataclass
class Progress:
    """Where a run stands: optimizer steps done, and the next sample's place in the data order."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batches of this epoch already consumed (on each process)
    skipped: list[dict] = field(default_factory=list)  # {"index", "path", "reason"} of samples left out so far


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def optimizer_file(rank: int) -> str:
    return f"optimizer-rank{rank}.safetensors"


def rng_state() -> dict:
    """The process's random states. (The trainer's noise has its own seed per sample: loop._sample_generator.)"""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class CheckpointWriter:
    """Writes checkpoints under `root`; in a multi-process run every process calls `save` (each writes its own
    random state), `barrier` synchronises them and only the main process writes the shared files."""

    root: Path
    keep: int = 1
    rank: int = 0
    is_main: bool = True
    barrier: object = lambda: None
    partitioned_optimizer: bool | str = False  # DeepSpeed ZeRO: every process holds (and saves) its own shard
    # (BY_PARAMETER: its slice of every parameter's state)
    world_size: int = 1

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, progress: Progress, weights: dict[str, torch.Tensor], optimizer_state: dict | None,
             scheduler_state: dict, rng: dict, config: dict, sharded: Callable[[Path], list] | None = None) -> Path:
        """Every process calls it. `sharded(folder)` (FSDP2), called on every process, writes the weights and the
        optimizer's tensors into the checkpoint's sharded/ folder and returns the optimizer's param_groups; then
        `weights` and `optimizer_state` are not used."""
        name = checkpoint_name(progress.step)
        final = self.root / name
        partial = self.root / f".{name}.partial"
        previous = self.latest()
        try:
            if self.is_main:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            self.barrier()
            write_tree(partial / rng_file(self.rank), rng, _state_class, save=_save_state)
            if sharded is not None:
                optimizer_state = {"param_groups": sharded(partial / SHARDED)}
            if self.partitioned_optimizer:
                write_tree(partial / optimizer_file(self.rank), optimizer_state, _state_class, save=_save_state)
            if self.is_main:
                if sharded is None:
                    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()},
                              str(partial / WEIGHTS))
                shared = None if self.partitioned_optimizer else optimizer_state
                write_tree(partial / OPTIMIZER, {"optimizer": shared, "scheduler": scheduler_state}, _state_class,
                           save=_save_state)
                state = {"version": FORMAT_VERSION, "progress": progress.__dict__, "config": config,
                         "partitioned_optimizer": self.partitioned_optimizer, "world_size": self.world_size,
                         "sharded": sharded is not None}
                (partial / STATE).write_text(json.dumps(state, indent=1))
            self.barrier()
            if self.is_main:
                self._publish(partial, final)
        except Exception as e:
            if self.is_main:
                shutil.rmtree(partial, ignore_errors=True)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointSaveError(f"saving checkpoint {final} failed ({type(e).__name__}: {e}); {kept}. Free "
                                      "space (or fix the cause) and continue with --resume") from e
        self.barrier()
        return final

    def _publish(self, partial: Path, final: Path) -> None:
        aside = None
        if final.exists():  # the same step saved again (after a resume): swap, never delete first
            aside = final.with_name(f".{final.name}.old")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(partial, final)
        write_text_atomic(self.root / LATEST, final.name + "\n")
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        complete = sorted(p for p in self.root.glob("step-*") if (p / STATE).is_file())
        for old in complete[: max(0, len(complete) - self.keep)]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names, else the highest complete one, else None."""
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / STATE).is_file():
            return named
    complete = sorted(p for p in root.glob("step-*") if (p / STATE).is_file())
    return complete[-1] if complete else None


@dataclass
class LoadedCheckpoint:
    path: Path
    progress: Progress
    weights: dict[str, torch.Tensor]
    optimizer_state: dict
    scheduler_state: dict
    rng: dict | None
    config: dict
    world_size: int = 1  # the processes that wrote it (positions count items per process)
    sharded: Path | None = None  # FSDP2: the folder of every process's shards (weights and optimizer tensors)


def find_checkpoint(output_path: str | os.PathLike, resume: str) -> Path:
    """`resume` is "latest" (the newest under output_path/checkpoints) or a checkpoint folder."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE).is_file():
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {STATE}); checkpoints "
                                    f"are the step-* folders under {Path(output_path) / CHECKPOINTS}")
        return path
    found = latest_checkpoint(Path(output_path) / CHECKPOINTS)
    if found is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {Path(output_path) / CHECKPOINTS}; a run writes one "
                                "every --save_steps steps (or at the end of each epoch)")
    return found


def read_state(path: Path, world_size: int = 1, rank: int = 0) -> dict:
    """The checkpoint's state.json (step, position, the run's config), refused when it is malformed, of another
    format, saved by another number of processes than this run's partitioned optimizer needs, or without the files
    process `rank` reads. Cheap: a run checks it before any model loads."""
    file = path / STATE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable checkpoint state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: not a checkpoint state (a JSON object)")
    if state.get("version") == 1:
        raise ValueError(f"{path} was written by an older qistudio, whose optimizer and random states are pickle "
                         "files, which are never loaded; start the run again (--lora_checkpoint can continue from "
                         "a saved LoRA file)")
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(f"{file}: checkpoint format {state.get('version')!r} is not {FORMAT_VERSION}")
    progress = state.get("progress")
    ints = ("step", "epoch", "position")
    if (not isinstance(progress, dict) or set(progress) != {*ints, "skipped"} or not isinstance(state.get("config"), dict)
            or not all(type(progress[k]) is int and progress[k] >= 0 for k in ints)
            or not isinstance(progress["skipped"], list)
            or not all(isinstance(s, dict) and set(s) == {"index", "path", "reason"} for s in progress["skipped"])):
        raise ValueError(f"{file}: malformed checkpoint state (progress needs step, epoch, position >= 0 and a "
                         "skipped list of index, path, reason; config an object)")
    saved_world = state.get("world_size", 1)
    by_parameter = state.get("partitioned_optimizer") == BY_PARAMETER  # any number of processes reads it
    if state.get("partitioned_optimizer") and not by_parameter and saved_world != world_size:
        raise ValueError(f"cannot resume from {path}: its optimizer state is partitioned over {saved_world} "
                         f"processes (DeepSpeed ZeRO), this run has {world_size}; resume with {saved_world}")
    weights = [] if state.get("sharded") else [WEIGHTS]
    ranks = range(_world_size(state, path)) if by_parameter else [rank] if state.get("partitioned_optimizer") else []
    for name in (*weights, OPTIMIZER, *(optimizer_file(r) for r in ranks)):
        _required(path / name)
    if state.get("sharded") and not (path / SHARDED).is_dir():
        raise ValueError(f"{path / SHARDED}: missing from the checkpoint (it was saved with FSDP2)")
    return state


def load_checkpoint(path: Path, rank: int = 0, world_size: int = 1) -> LoadedCheckpoint:
    """Everything a checkpoint holds for process `rank`; a missing, unreadable or malformed file is one ValueError
    naming it. Only safetensors and JSON are read (nothing a file holds can run code)."""
    state = read_state(path, world_size, rank)
    states = read_tree(path / OPTIMIZER, _state_class)
    if not isinstance(states, dict) or not {"optimizer", "scheduler"} <= set(states):
        raise ValueError(f"{path / OPTIMIZER}: holds no optimizer and scheduler state")
    if state.get("partitioned_optimizer") == BY_PARAMETER:  # read by slices later (zero.load_state_by_parameter)
        files = [path / optimizer_file(r) for r in range(_world_size(state, path))]
        states["optimizer"] = {BY_PARAMETER_FILES: files}
    elif state.get("partitioned_optimizer"):
        states["optimizer"] = read_tree(path / optimizer_file(rank), _state_class)
    rng_path = path / rng_file(rank)
    rng = read_tree(rng_path, _state_class) if rng_path.is_file() else None
    weights = {}
    try:
        if not state.get("sharded"):
            weights = load_file(str(path / WEIGHTS))
    except SafetensorError as e:
        raise ValueError(f"{path / WEIGHTS}: not a readable safetensors file ({e})") from None
    return LoadedCheckpoint(path, Progress(**state["progress"]), weights, states["optimizer"], states["scheduler"],
                            rng, state["config"], _world_size(state, path),
                            path / SHARDED if state.get("sharded") else None)


def _world_size(state: dict, path: Path) -> int:
    size = state.get("world_size", 1)
    if type(size) is not int or size < 1:
        raise ValueError(f"{path / STATE}: world_size must be a positive integer, got {size!r}")
    return size


def _required(file: Path) -> Path:
    if not file.is_file():
        raise ValueError(f"{file}: missing from the checkpoint (format {FORMAT_VERSION} keeps its state in "
                         ".safetensors and .json files only)")
    return file
