"""The training loop: data order -> encode -> loss -> backward -> optimizer step -> outputs and checkpoints.

Design note. Randomness is owned, not ambient: the data order of epoch e is a function of (seed, e) alone
(data.epoch_order), and every noise tensor and sigma comes from the trainer's own generator (seeded per process),
whose state goes into each checkpoint with torch's, CUDA's and Python's. A checkpoint is taken only between
optimizer steps, recording the epoch and how far into its order each process is, so a resumed run replays
exactly what the killed one would have done next. With several processes (accelerate launch), process r takes
items r, r + P, ... of the epoch's order (the tail that does not divide evenly is dropped, so all processes run
the same number of steps) and DDP averages the gradients.

Gradient accumulation is done by hand (loss / K, DDP's no_sync between boundaries) rather than by accelerate's
counter, so its state is just the position; the last, partial group of an epoch steps too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..components import Components
from .adapters import make_trainable, trainable_named_parameters
from .checkpoint import (CHECKPOINTS, CheckpointWriter, Progress, find_checkpoint, load_checkpoint, restore_rng,
                         rng_state)
from .config import RESUME_KEYS, TrainConfig
from .data import ImageDataset, Skipped, epoch_order, skip_report
from .encode import encode_sample
from .loss import fixed_noise_loss, flow_matching_loss
from .models import compute_dtype, load_training_components, prepare_frozen
from .optim import make_lr_scheduler, make_optimizer
from .outputs import save_weights, write_config
from .timesteps import draw_sigma

logger = logging.getLogger(__name__)


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)]
    return Accelerator(cpu=config.device == "cpu", kwargs_handlers=handlers)


def _identity(item):
    return item


@dataclass
class StepRecord:
    step: int
    loss: float  # mean of the step's micro-batch losses (weighted, before the 1/K scaling)
    lr: float


class Trainer:
    """`Trainer(config).run()`. `components` (already loaded; the DiT is trained in place) skips loading;
    `resume` is "latest" or a checkpoint folder; `on_step(trainer)` runs after each optimizer step."""

    def __init__(self, config: TrainConfig, components: Components | None = None, resume: str | None = None,
                 accelerator=None, progress_bar: bool = True):
        config.check()
        self.config = config
        self.accelerator = accelerator or make_accelerator(config)
        acc = self.accelerator
        self.device = acc.device
        self.dtype = compute_dtype(config, self.device)
        self.dataset = ImageDataset(config.data)  # metadata errors (and strict mode's missing files) before loading
        if self.dataset.missing:
            logger.warning("%d sample(s) list images that do not exist; they will be skipped and listed at the end",
                           len(self.dataset.missing))
        resume_path = find_checkpoint(config.output_path, resume) if resume else None
        if components is None:
            with acc.main_process_first():
                components = load_training_components(config, self.device, self.dtype)
        else:
            prepare_frozen(components)
        self.components = components
        torch.manual_seed(config.seed)  # the LoRA's initialisation
        self.trained = make_trainable(components.dit, config)
        components.dit.gradient_checkpointing = config.use_gradient_checkpointing
        components.dit.train()
        parameters = trainable_named_parameters(components.dit)
        self.optimizer = make_optimizer(parameters.values(), config)
        self.total_steps = self._total_steps()
        self.lr_scheduler = make_lr_scheduler(self.optimizer, config, self.total_steps)
        self.model, self.optimizer = acc.prepare(components.dit, self.optimizer)
        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + acc.process_index)
        self.progress = Progress()
        self.history: list[StepRecord] = []
        self.writer = CheckpointWriter(Path(config.output_path) / CHECKPOINTS, config.keep_checkpoints,
                                       acc.process_index, acc.is_main_process, acc.wait_for_everyone)
        self.progress_bar = progress_bar and acc.is_main_process
        self._last_good = None  # the last readable sample, which stands in for a skipped one under DDP
        self._saved_step = 0
        if resume_path is not None:
            self._restore(resume_path)

    # -- bookkeeping ------------------------------------------------------------------------------------------------
    @property
    def dit(self):
        return self.components.dit

    def _micro_per_epoch(self) -> int:
        return len(self.dataset) // self.accelerator.num_processes

    def _total_steps(self) -> int:
        micro = self._micro_per_epoch()
        if micro == 0:
            raise ValueError(f"the dataset has {len(self.dataset)} samples for {self.accelerator.num_processes} "
                             "processes; each process needs at least one (raise --dataset_repeat)")
        steps = math.ceil(micro / self.config.gradient_accumulation_steps) * self.config.num_epochs
        return min(steps, self.config.max_steps) if self.config.max_steps else steps

    def _order(self, epoch: int) -> list[int]:
        acc = self.accelerator
        order = epoch_order(len(self.dataset), self.config.seed, epoch)
        return order[acc.process_index::acc.num_processes][: self._micro_per_epoch()]

    def _restore(self, path: Path) -> None:
        loaded = load_checkpoint(path, self.accelerator.process_index)
        saved, ours = loaded.config, json.loads(self.config.to_json())  # both as JSON has them (lists, not tuples)
        different = [k for k in RESUME_KEYS if saved.get(k) != ours.get(k)]
        if different:
            shown = ", ".join(f"{k}: {saved.get(k)!r} there, {ours.get(k)!r} now" for k in different)
            raise ValueError(f"cannot resume from {path}: it was trained with other settings ({shown})")
        if saved.get("dataset_length", len(self.dataset)) != len(self.dataset):
            raise ValueError(f"cannot resume from {path}: the dataset had {saved['dataset_length']} samples (with "
                             f"repeat), now {len(self.dataset)}; the data order would not continue")
        parameters = trainable_named_parameters(self.dit)
        if set(loaded.weights) != set(parameters):
            raise ValueError(f"cannot resume from {path}: its trainable tensors do not match this run's")
        with torch.no_grad():
            for name, param in parameters.items():
                param.copy_(loaded.weights[name])
        self.optimizer.load_state_dict(loaded.optimizer_state)
        self.lr_scheduler.load_state_dict(loaded.scheduler_state)
        self.progress = loaded.progress
        if loaded.rng is not None:
            restore_rng(loaded.rng, self.generator)
        logger.info("resumed from %s at step %d", path, self.progress.step)

    # -- one step ---------------------------------------------------------------------------------------------------
    def _micro_batch(self, item, scale: float, sync: bool) -> float | None:
        """Forward and backward of one sample; returns its loss, or None when it was skipped."""
        if isinstance(item, Skipped):
            self.progress.skipped.append(item.__dict__)
            if self.accelerator.num_processes == 1:
                return None
            # Under DDP every process must reduce gradients together: run the last good sample at weight 0.
            if self._last_good is None:
                raise RuntimeError(f"the first sample of a process is unreadable ({item.path}) in a multi-process "
                                   "run; fix or remove it")
            encoded, weight = self._last_good, 0.0
        else:
            encoded = encode_sample(self.components, item, self.config.extra_inputs, self.config.zero_cond_t,
                                    self.device, self.dtype)
            self._last_good, weight = encoded, 1.0
        sigma, sigma_weight = draw_sigma(self.config.loss, self.generator, encoded.num_target_tokens)
        noise = torch.randn(encoded.latents.shape, generator=self.generator).to(self.device, encoded.latents.dtype)
        with contextlib.ExitStack() as stack:
            if not sync:
                stack.enter_context(self.accelerator.no_sync(self.model))
            with self._activation_storage():
                loss = flow_matching_loss(self.model, encoded, sigma, noise, sigma_weight * weight)
            self.accelerator.backward(loss * scale)
        return float(loss.detach()) if weight else None

    def _activation_storage(self):
        if not self.config.use_gradient_checkpointing_offload:
            return contextlib.nullcontext()
        # What autograd saves for the backward (with checkpointing: each block's inputs) waits in host memory.
        return torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")

    def _optimizer_step(self, losses: list[float]) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        loss = sum(losses) / len(losses) if losses else float("nan")
        self.history.append(StepRecord(self.progress.step, loss, lr))

    def evaluate(self, indices: list[int], sigmas=(0.2, 0.4, 0.6, 0.8, 0.95), seed: int = 0) -> float:
        """Mean unweighted loss of the given dataset items at fixed sigmas and fixed noise (a validation loss)."""
        losses = []
        for index in indices:
            item = self.dataset[index]
            if isinstance(item, Skipped):
                continue
            encoded = encode_sample(self.components, item, self.config.extra_inputs, self.config.zero_cond_t,
                                    self.device, self.dtype)
            losses.append(fixed_noise_loss(self.model, encoded, list(sigmas), seed))
        if not losses:
            raise ValueError(f"none of the items {indices} could be read")
        return sum(losses) / len(losses)

    # -- saving -----------------------------------------------------------------------------------------------------
    def save(self, file_name: str) -> None:
        """The user-facing weights file, then the resume checkpoint (both atomic)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        dit = acc.unwrap_model(self.model)
        if acc.is_main_process:
            save_weights(dit, self.config, file_name, self.progress.step)
        config = dict(self.config.to_dict(), dataset_length=len(self.dataset))
        self.writer.save(self.progress, trainable_named_parameters(dit), self.optimizer.state_dict(),
                         self.lr_scheduler.state_dict(), rng_state(self.generator), config)
        self._saved_step = self.progress.step

    # -- the loop ---------------------------------------------------------------------------------------------------
    def run(self, on_step: Callable[["Trainer"], None] | None = None) -> list[StepRecord]:
        config, acc = self.config, self.accelerator
        if acc.is_main_process:
            write_config(config, config.output_path)
            logger.info("training %s for %d steps on %d process(es)", "; ".join(self.trained), self.total_steps,
                        acc.num_processes)
        bar = tqdm(total=self.total_steps, initial=self.progress.step, disable=not self.progress_bar, unit="step",
                   desc="training")
        self._saved_step = self.progress.step
        done = self.progress.step >= self.total_steps
        while not done and self.progress.epoch < config.num_epochs:
            done = self._run_epoch(bar, on_step)
            if self.progress.position >= len(self._order(self.progress.epoch)):
                finished = self.progress.epoch
                self.progress.epoch += 1  # before saving: a resume starts at the next epoch
                self.progress.position = 0
                if config.save_steps is None:
                    self.save(f"epoch-{finished}.safetensors")
        bar.close()
        if self.progress.step != self._saved_step:
            self.save(f"step-{self.progress.step}.safetensors")
        if self.progress.skipped and acc.is_main_process:
            logger.warning(skip_report([Skipped(**s) for s in self.progress.skipped]))
        return self.history

    def _loader(self, order: list[int]):
        if self.config.data.num_workers == 0:
            return (self.dataset[i] for i in order)
        return iter(torch.utils.data.DataLoader(self.dataset, sampler=order, batch_size=None, collate_fn=_identity,
                                                num_workers=self.config.data.num_workers))

    def _run_epoch(self, bar, on_step) -> bool:
        """Run the rest of the current epoch; True when the run is done (max_steps reached)."""
        config = self.config
        order = self._order(self.progress.epoch)
        accumulation = config.gradient_accumulation_steps
        losses: list[float] = []
        group = 0
        for item in self._loader(order[self.progress.position:]):
            self.progress.position += 1
            group += 1
            boundary = group == accumulation or self.progress.position == len(order)
            loss = self._micro_batch(item, 1.0 / accumulation, sync=boundary)
            if loss is not None:
                losses.append(loss)
            if not boundary:
                continue
            self._optimizer_step(losses)
            bar.update(1)
            bar.set_postfix(loss=f"{self.history[-1].loss:.4f}", lr=f"{self.history[-1].lr:.2e}")
            losses, group = [], 0
            if config.save_steps is not None and self.progress.step % config.save_steps == 0:
                self.save(f"step-{self.progress.step}.safetensors")
            if on_step is not None:
                on_step(self)
            if self.progress.step >= self.total_steps:
                return True
        return False
