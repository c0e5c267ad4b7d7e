"""Resume checkpoints: everything a killed run needs to continue as if it had never stopped, written atomically.

Design note. A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
  weights.safetensors   the trainable tensors, exactly as trained (LoRA factors in float32, or the whole DiT)
  optimizer.pt          optimizer and LR-scheduler state (tensors and numbers only: read back with weights_only)
  optimizer-rank{R}.pt  instead of the optimizer part above when the optimizer is partitioned across processes
                        (DeepSpeed ZeRO): each process's own shard, resumable only with as many processes
  rng-rank{R}.pt        each process's random states: torch, CUDA, Python and the trainer's noise generator
  state.json            step, epoch, position in the epoch's order, skipped samples, and the run's config
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

import torch
from safetensors.torch import load_file, save_file

from .outputs import write_text_atomic

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.json"
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.pt"
FORMAT_VERSION = 1


class CheckpointSaveError(RuntimeError):
    """Saving a resume checkpoint failed; the previous one (if any) is intact."""


@dataclass
class Progress:
    """Where a run stands: optimizer steps done, and the next sample's place in the data order."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batches of this epoch already consumed (on each process)
    skipped: list[dict] = field(default_factory=list)  # {"index", "path", "reason"} of samples left out so far


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])
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
    partitioned_optimizer: bool = False  # DeepSpeed ZeRO: every process holds (and saves) its own shard
    world_size: int = 1

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, progress: Progress, weights: dict[str, torch.Tensor], optimizer_state: dict,
             scheduler_state: dict, rng: dict, config: dict) -> Path:
        name = checkpoint_name(progress.step)
        final = self.root / name
        partial = self.root / f".{name}.partial"
        previous = self.latest()
        try:
            if self.is_main:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            self.barrier()
            torch.save(rng, partial / f"rng-rank{self.rank}.pt")
            if self.partitioned_optimizer:
                torch.save(optimizer_state, partial / f"optimizer-rank{self.rank}.pt")
            if self.is_main:
                save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(partial / WEIGHTS))
                shared = None if self.partitioned_optimizer else optimizer_state
                torch.save({"optimizer": shared, "scheduler": scheduler_state}, partial / OPTIMIZER)
                state = {"version": FORMAT_VERSION, "progress": progress.__dict__, "config": config,
                         "partitioned_optimizer": self.partitioned_optimizer, "world_size": self.world_size}
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


def read_state(path: Path, world_size: int = 1) -> dict:
    """The checkpoint's state.json (step, position, the run's config), refused when this version or this number
    of processes cannot resume from it. Cheap: a run checks it before any model loads."""
    state = json.loads((path / STATE).read_text())
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {state.get('version')} is not {FORMAT_VERSION}")
    saved_world = state.get("world_size", 1)
    if state.get("partitioned_optimizer") and saved_world != world_size:
        raise ValueError(f"cannot resume from {path}: its optimizer state is partitioned over {saved_world} "
                         f"processes (DeepSpeed ZeRO), this run has {world_size}; resume with {saved_world}")
    return state


def load_checkpoint(path: Path, rank: int = 0, world_size: int = 1) -> LoadedCheckpoint:
    state = read_state(path, world_size)
    states = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    if state.get("partitioned_optimizer"):
        # DeepSpeed's shard holds its own objects (a loss scaler, its config): not loadable with weights_only.
        # The file is this trainer's own output, read back by the run that wrote it.
        states["optimizer"] = torch.load(path / f"optimizer-rank{rank}.pt", map_location="cpu", weights_only=False)
    rng_file = path / f"rng-rank{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    return LoadedCheckpoint(path, Progress(**state["progress"]), load_file(str(path / WEIGHTS)), states["optimizer"],
                            states["scheduler"], rng, state["config"])
