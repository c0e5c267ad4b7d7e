"""The training loop: data order -> encode -> loss -> backward -> optimizer step -> outputs and checkpoints.

Design note. Randomness is owned, not ambient: the data order of epoch e is a function of (seed, e) alone
(data.epoch_order; with size buckets, buckets.bucketed_order of the same and the images' sizes), and the noise and
sigma of the sample at place i of that order come from a generator seeded with (seed, e, i) alone. A checkpoint
is taken only between optimizer steps, recording the epoch and how far into its order the run is, so a resumed
run replays exactly what the killed one would have done next. With several processes (torchrun or accelerate
launch), process r takes items r, r + P, ... of the epoch's order (the tail that does not divide evenly is
dropped, so all processes run the same number of steps) and DDP or FSDP averages the gradients: N processes train
exactly what one process accumulating N micro-batches trains (up to float rounding), and a checkpoint resumes
under another number of processes at the same place of the order (resume.py checks and restores it).
distributed.py joins the processes (and stops them all when one fails); fsdp.py shards the DiT.

Gradient accumulation is done by hand (loss / K, DDP's no_sync between boundaries) rather than by accelerate's
counter, so its state is just the position; the last, partial group of an epoch steps too (under DeepSpeed the
boundary is handed to it: zero.py).

Around the steps: with cache_dir the samples are encoded once into a folder and the DiT trains from it with the
text encoder and VAE released (cache.py); validation images are rendered on the main process (samples.py); each
step's loss, rate, time and peak memory go to the progress bar and the logs (logs.py).

Nothing non-finite is trained on or saved: a loss that is NaN or infinite stops the run before its backward
(NonFiniteError, naming the step and the sample), and every save first checks the trained tensors. Under several
processes both checks agree across all of them (one tiny all-reduce), so none is left waiting for the others.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..compile import compile_repeated_blocks
from ..components import Components
from . import distributed, fsdp
from .adapters import make_trainable, trainable_named_parameters
from .checkpoint import CHECKPOINTS, CheckpointWriter, Progress, find_checkpoint, rng_state
from .buckets import bucketed_order, buckets_on, item_sizes
from .cache import build_cache, encoding_fingerprint, release_encoders
from .config import TrainConfig
from .data import ImageDataset, Skipped, epoch_order, skip_report
from .encode import EncodedSample
from .family import data_rules, detect_family, encode_for, images_per_sample, row_check, validation_inputs
from .errors import NonFiniteError
from .lock import acquire as acquire_lock
from .logs import TrainingLog, summary_writer_class
from .loss import Denoiser, fixed_noise_loss, flow_matching_loss
from .lowmem import load_device, setup_low_memory
from .models import compute_dtype, load_training_components, prepare_frozen
from .optim import make_lr_scheduler, make_optimizer
from .outputs import exported_name, save_weights, weights_metadata, write_config
from .resume import check_resumable, restore
from .samples import render_samples
from .sharded_checkpoint import save_sharded, write_consolidated
from .timesteps import draw_sigma
from .tree import map_tensors
from .zero import (deepspeed_plugin, gathered_state, holding, is_zero3, optimizer_state, partition_dit,
                   partitioned_optimizer, partitions_on_load, prepare_deepspeed, set_boundary)
from .zero import loading as zero_loading

logger = logging.getLogger(__name__)


def make_accelerator(config: TrainConfig):
    return distributed.make_accelerator(config.device, config.process_group_timeout, config.find_unused_parameters)


def _identity(item):
    return item


@dataclass
class StepRecord:
    step: int
    loss: float  # mean of the step's micro-batch losses (weighted, before the 1/K scaling)
    lr: float


def _describe(item) -> str:
    """A sample for messages: its prompt (the loaded sample keeps no path), or what a cached one is."""
    if isinstance(item, dict):
        return f"the sample with prompt {str(item.get('prompt'))[:60]!r}"
    return "a cached sample"


class Trainer:
    """`Trainer(config).run()`. `components` (already loaded; the DiT is trained in place) skips loading;
    `resume` is "latest" or a checkpoint folder; `on_step(trainer)` runs after each optimizer step. The output
    folder is locked (lock.py) from construction until run() ends; `release_lock()` frees it for a Trainer not run."""

    def __init__(self, config: TrainConfig, components: Components | None = None, resume: str | None = None,
                 accelerator=None, progress_bar: bool = True):
        config.check()
        self.config = config
        self.accelerator = accelerator or make_accelerator(config)
        acc = self.accelerator
        self.device = acc.device
        self.dtype = compute_dtype(config, self.device)
        self.progress_bar = progress_bar
        self.fsdp = fsdp.settings(config, self.accelerator)  # FSDP2's settings, None when the DiT is not sharded
        # Metadata errors (and strict mode's missing files) before loading; a row the pipeline's request checks
        # refuse (say, two entity prompts and three masks) is skipped like an unreadable image. Which model the DiT's
        # files hold (Qwen-Image, Layered, 2.1: family.py) says how rows are checked, loaded and encoded.
        self.family = detect_family(config, components, self.accelerator)
        rules = data_rules(self.family)
        self.dataset = ImageDataset(config.data, row_check(config, self.family), rules.rgba_keys, rules.list_keys)
        if self.dataset.missing:
            logger.warning("%d sample(s) list images that do not exist; they will be skipped and listed at the end",
                           len(self.dataset.missing))
        self.total_steps = self._total_steps()  # a dataset too small for the processes stops the run here
        resume_path = self._check_before_loading(resume)
        # One run per output folder (lock.py): taken before any model loads, given back when run() ends.
        self._lock = acquire_lock(config.output_path) if acc.is_main_process else None
        try:
            self._build(components)
            if resume_path is not None:
                self.progress = restore(resume_path, acc, self.trained_module, self.dit, self.optimizer,
                                        self.lr_scheduler)
        except BaseException:
            self.release_lock()
            raise

    def _build(self, components: Components | None) -> None:
        """Load (or take) the models, make what trains trainable, and prepare it with its optimizer."""
        config, acc = self.config, self.accelerator
        # Data order: same-size samples at the same step on every process (buckets.py), from the images' headers.
        bucketed = buckets_on(config.buckets, config.data, acc.num_processes)
        self._item_sizes = item_sizes(self.dataset) if bucketed else None
        self.components = components = self._load(components)
        torch.manual_seed(config.seed)  # the LoRA's initialisation
        # What trains and is saved (the DiT or the ControlNet); the Denoiser (DiT + ControlNets) is what runs.
        self.trained_module, self.trained = make_trainable(components, config)
        components.dit.gradient_checkpointing = config.use_gradient_checkpointing
        components.dit.checkpointed_blocks = config.checkpointed_blocks
        self.low_memory = setup_low_memory(components, config, self.device,  # FP8 base, streamed blocks (or None)
                                           images_per_sample(self.family, config, self.dataset.rows))
        if self.fsdp is not None:
            components.dit.gradient_checkpointing |= self.fsdp.activation_checkpointing
            distributed.ensure_process_group(self.device, config.process_group_timeout)
            fsdp.shard_dit(components.dit, components.disk_sources.pop("dit"), self.device, self.fsdp)
        elif "dit" in components.disk_sources and partitions_on_load(acc, config.trainable_models):
            self.zero_partition = partition_dit(acc, components.dit, components.disk_sources.pop("dit"))
        if config.compile:
            compile_repeated_blocks(components.dit, fullgraph=False)
        denoiser = Denoiser(components.dit, components.controlnets).train()
        parameters = trainable_named_parameters(self.trained_module)
        self.optimizer = make_optimizer(parameters.values(), config)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, config, self.total_steps)
        if self.fsdp is not None:
            self.model = denoiser  # FSDP2 wrapped the DiT in place; accelerate's prepare is not used (fsdp.py)
        else:
            placement = None if self.low_memory is None else self.low_memory.device_placement
            prepare_deepspeed(acc)
            distributed.ignore_frozen(denoiser)  # DDP: the frozen base is every process's own (distributed.py)
            self.model, self.optimizer = acc.prepare(denoiser, self.optimizer, device_placement=placement)
        self.progress = Progress()
        self.history: list[StepRecord] = []
        self.writer = CheckpointWriter(Path(config.output_path) / CHECKPOINTS, config.keep_checkpoints,
                                       acc.process_index, acc.is_main_process, acc.wait_for_everyone,
                                       partitioned_optimizer=partitioned_optimizer(acc, self.optimizer),
                                       world_size=acc.num_processes)
        self.progress_bar = self.progress_bar and acc.is_main_process
        self._last_good = None  # the last readable sample, which stands in for a skipped one under DDP
        self._saved_step = 0
        self.last_saved: Path | None = None  # the user-facing weights file written last (main process)
        self._used = 0  # samples trained on since this run started (to stop a run whose every sample is skipped)
        self.cached = None  # with cache_dir: the CachedDataset the DiT trains from, once run() has built it
        self.cache_report = None  # and what building it did (cache.CacheReport)
        self.log = None  # the main process's TrainingLog during run()

    def _load(self, components: Components | None) -> Components:
        """The models loaded (or the given ones), frozen, the encoders on the device."""
        config, acc = self.config, self.accelerator
        if components is not None:
            if self.fsdp is not None:
                raise ValueError("FSDP2 loads the DiT itself, each process reading its shard: give no components")
            prepare_frozen(components, config)
            return components
        load_on = load_device(config, self.device)  # host memory when the DiT is placed by parts
        on_disk = self.fsdp is not None or partitions_on_load(acc, config.trainable_models)  # each reads its part
        if config.initialize_model_on_cpu and not on_disk:
            load_on = torch.device("cpu")  # ZeRO-3: accelerate.prepare places (and partitions) the DiT
        with acc.main_process_first(), zero_loading(acc):
            components = load_training_components(config, load_on, self.dtype, dit_blocks_on_disk=on_disk,
                                                  family=self.family)
        if config.initialize_model_on_cpu and not on_disk:
            for model in (components.text_encoder, components.vae):
                model.to(self.device)  # the frozen encoders are not accelerate's to place
        return components

    def release_lock(self) -> None:
        """Give the output folder's lock back (run() does when it ends; call it for a Trainer never run)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _check_before_loading(self, resume: str | None) -> Path | None:
        """What can stop the run without any model loaded; returns the checkpoint to resume from (or None)."""
        config = self.config
        if config.enable_tensorboard_log:
            summary_writer_class()  # a missing package
        if config.validation_prompts and (is_zero3(self.accelerator) or self.fsdp is not None):
            raise ValueError("validation_prompts under DeepSpeed ZeRO-3 or FSDP are not supported: the main process "
                             "alone cannot run a sharded DiT; render afterwards with `qistudio validate`")
        self._check_optimizer()
        resume_path = find_checkpoint(config.output_path, resume) if resume else None
        if resume_path is not None:
            check_resumable(resume_path, config, self.accelerator, self.fsdp is not None, len(self.dataset))
        return resume_path

    def _check_optimizer(self) -> None:
        """The optimizer settings against the engine (settings alone: TrainConfig.check)."""
        config, sharded = self.config, self.fsdp is not None or deepspeed_plugin(self.accelerator) is not None
        if config.fused_optimizer_step and (sharded or self.accelerator.num_processes > 1):
            raise ValueError("fused_optimizer_step runs in one process without DeepSpeed or FSDP (the step would "
                             "see a gradient not yet reduced across processes); with several, FSDP already keeps "
                             "1/N of the gradients per process")
        if config.optimizer == "adamw_8bit" and sharded:
            raise ValueError("adamw_8bit (bitsandbytes) cannot step FSDP's or DeepSpeed's sharded parameters; use "
                             "adamw_bf16 or adafactor there")

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
        # max_steps wins over num_epochs, as in diffusers' and accelerate's scripts: fewer steps end the run early,
        # more run further epochs (each a new order of the data).
        if self.config.max_steps is not None:
            return self.config.max_steps
        return math.ceil(micro / self.config.gradient_accumulation_steps) * self.config.num_epochs

    def _order(self, epoch: int) -> list[int]:
        acc = self.accelerator
        if self._item_sizes is not None:
            order = bucketed_order(self._item_sizes, acc.num_processes, self.config.seed, epoch,
                                   self.config.gradient_accumulation_steps)
        else:
            order = epoch_order(len(self.dataset), self.config.seed, epoch)
        return order[acc.process_index::acc.num_processes][: self._micro_per_epoch()]

    # -- one step ---------------------------------------------------------------------------------------------------
    def _micro_batch(self, item, scale: float, sync: bool) -> float | None:
        """Forward and backward of one sample; returns its loss, or None when it was skipped. A loss that is not
        finite stops the run before its backward (NonFiniteError): the weights never see it."""
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
            encoded = self._encode(item)
            self._last_good, weight = encoded, 1.0
            self._used += 1
        generator = self._sample_generator()
        sigma, sigma_weight = draw_sigma(self.config.loss, generator, encoded.num_target_tokens)
        noise = torch.randn(encoded.latents.shape, generator=generator).to(self.device, encoded.latents.dtype)
        with contextlib.ExitStack() as stack:
            if not sync and self.fsdp is None:  # FSDP2 reduce-scatters every micro-batch (fsdp.py)
                stack.enter_context(self.accelerator.no_sync(self.model))
            with self._activation_storage():
                loss = flow_matching_loss(self.model, encoded, sigma, noise, sigma_weight * weight)
            self._stop_unless_finite(loss.detach(), item)
            set_boundary(self.accelerator, sync)  # DeepSpeed steps inside backward at a boundary
            if self.fsdp is not None:
                (loss * scale).backward()
            else:
                self.accelerator.backward(loss * scale)
        return float(loss.detach()) if weight else None

    def _sample_generator(self) -> torch.Generator:
        """The noise and sigma of the micro-batch just taken, from (seed, epoch, its place in the epoch's order)
        alone: the same sample draws the same noise whichever process takes it, so N processes equal one process
        accumulating N micro-batches, and a resume with another number of processes continues alike."""
        acc = self.accelerator
        index = (self.progress.position - 1) * acc.num_processes + acc.process_index  # in the epoch's whole order
        seed = (self.config.seed * 1_000_003 + self.progress.epoch) * 1_000_003 + index
        return torch.Generator().manual_seed(seed % 2**63)

    def _all_processes_fine(self, fine: bool) -> bool:
        """True when `fine` holds on every process: a process that stops alone would leave the others waiting."""
        if self.accelerator.num_processes == 1:
            return fine
        flag = torch.tensor([0 if fine else 1], device=self.device)
        return int(self.accelerator.reduce(flag, reduction="sum").item()) == 0

    def _stop_unless_finite(self, loss: torch.Tensor, item) -> None:
        finite = bool(torch.isfinite(loss).all())
        if self._all_processes_fine(finite):
            return
        step = self.progress.step + 1
        where = f"the loss of {_describe(item)} is {float(loss):g}" if not finite else "another process's loss is not finite"
        raise NonFiniteError(f"step {step}: {where}; the run stops before it reaches the weights. "
                             f"{self._latest_note()} Lower --learning_rate (now {self.config.learning_rate:g}), or "
                             "check that sample and the models' weights")

    def _latest_note(self) -> str:
        latest = self.writer.latest()
        if latest is None:
            return "No checkpoint was saved yet."
        return f"The last checkpoint, {latest}, is intact (--resume continues from it)."

    def _encode(self, item) -> EncodedSample:
        """A loaded sample through the frozen encoders, or one from the sample cache moved to the device."""
        if not isinstance(item, dict):  # an encoded sample (EncodedSample, or a Layered or 2.1 one)
            return map_tensors(item, lambda tensor: tensor.to(self.device))
        return encode_for(self.family, self.components, item, self.config, self.device, self.dtype)

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
            item = (self.dataset if self.cached is None else self.cached)[index]
            if isinstance(item, Skipped):
                continue
            encoded = self._encode(item)
            losses.append(fixed_noise_loss(self.model, encoded, list(sigmas), seed))
        if not losses:
            raise ValueError(f"none of the items {indices} could be read")
        return sum(losses) / len(losses)

    # -- saving -----------------------------------------------------------------------------------------------------
    def save(self, file_name: str) -> None:
        """The user-facing weights file, then the resume checkpoint (both atomic); neither when a trained tensor is
        not finite (NonFiniteError)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        trained = self.trained_module  # the module itself, whatever wrapper accelerate put around the Denoiser
        # ZeRO-3: every process takes part in gathering the partitioned weights; the main one writes them (zero.py).
        gathered = gathered_state(acc, self.model, trained) if is_zero3(acc) else {}
        config = dict(self.config.to_dict(), dataset_length=len(self.dataset))
        if self.fsdp is not None:
            self._save_sharded(file_name, config)
            return
        optimizer = optimizer_state(acc, self.optimizer, trainable_named_parameters(trained))  # ZeRO-3: by parameter
        with holding(trained, gathered):
            self._check_finite_weights(trained)
            if acc.is_main_process:
                self.last_saved = save_weights(trained, self.config, file_name, self.progress.step)
            self.writer.save(self.progress, trainable_named_parameters(trained), optimizer,
                             self.lr_scheduler.state_dict(), rng_state(), config)
        self._saved_step = self.progress.step

    def _save_sharded(self, file_name: str, config: dict) -> None:
        """FSDP2: the consolidated weights file (gathered tensor by tensor, the main process writing), then every
        process's shards into the checkpoint (sharded_checkpoint.py)."""
        acc, trained = self.accelerator, self.trained_module
        self._check_finite_weights(trained)
        tensors = {exported_name(name, self.config): tensor for name, tensor in trained.state_dict().items()}
        path = Path(self.config.output_path) / file_name
        write_consolidated(tensors, path, weights_metadata(self.config, self.progress.step), acc.is_main_process)
        if acc.is_main_process:
            self.last_saved = path
        self.writer.save(self.progress, {}, None, self.lr_scheduler.state_dict(), rng_state(), config,
                         sharded=lambda folder: save_sharded(folder, self.dit, self.optimizer))
        self._saved_step = self.progress.step

    def _check_finite_weights(self, trained: torch.nn.Module) -> None:
        """Before a save: every trained tensor finite on every process (one read of each: cheap beside writing)."""
        bad = next((name for name, tensor in trainable_named_parameters(trained).items()
                    if not bool(torch.isfinite(fsdp.local_tensor(tensor.detach())).all())), None)
        if not self._all_processes_fine(bad is None):
            what = f"the trained tensor {bad}" if bad else "another process's trained tensors"
            raise NonFiniteError(f"step {self.progress.step}: {what} holds NaN or infinity; nothing is saved. "
                                 f"{self._latest_note()} Lower --learning_rate (now {self.config.learning_rate:g})")

    # -- the loop ---------------------------------------------------------------------------------------------------
    def run(self, on_step: Callable[["Trainer"], None] | None = None) -> list[StepRecord]:
        """Train to the last step (saving as configured) and give the output folder's lock back, however it ends."""
        if self._lock is None and self.accelerator.is_main_process:
            self._lock = acquire_lock(self.config.output_path)
        acc = self.accelerator
        try:
            with distributed.failures_explained(acc.process_index, self.config.process_group_timeout,
                                                self._latest_note):
                return self._run(on_step)
        finally:
            self.release_lock()

    def _run(self, on_step) -> list[StepRecord]:
        config, acc = self.config, self.accelerator
        if acc.is_main_process:
            write_config(config, config.output_path)
            logger.info("training %s for %d steps on %d process(es)", "; ".join(self.trained), self.total_steps,
                        acc.num_processes)
        if config.cache_dir is not None and self.cached is None:
            self._build_cache()
        self.log = TrainingLog(config, self.progress.step) if acc.is_main_process else None
        bar = tqdm(total=self.total_steps, initial=self.progress.step, disable=not self.progress_bar, unit="step",
                   desc="training")
        self._saved_step = self.progress.step
        self._clock = time.perf_counter()
        done = self.progress.step >= self.total_steps
        try:
            while not done:  # the step count ends the run (max_steps, or num_epochs' worth of steps)
                fresh_epoch = self.progress.position == 0
                done = self._run_epoch(bar, on_step)
                if self.progress.position >= len(self._order(self.progress.epoch)):
                    if fresh_epoch and self._used == 0:
                        raise ValueError("no sample of a whole epoch could be used; "
                                         + skip_report([Skipped(**s) for s in self.progress.skipped]))
                    finished = self.progress.epoch
                    self.progress.epoch += 1  # before saving: a resume starts at the next epoch
                    self.progress.position = 0
                    if config.save_steps is None:
                        self.save(f"epoch-{finished}.safetensors")
        finally:
            bar.close()
            if self.log is not None:
                self.log.close()
        if self.progress.step != self._saved_step:
            self.save(f"step-{self.progress.step}.safetensors")
        if self.progress.skipped and acc.is_main_process:
            logger.warning(skip_report([Skipped(**s) for s in self.progress.skipped]))
        return self.history

    def _build_cache(self) -> None:
        """cache_dir: encode what the folder lacks, then train from it without the text encoder and VAE (kept in
        host memory when validation images still need them)."""
        fingerprint = encoding_fingerprint(self.components, self.config, self.device, self.dtype)
        self.cached, self.cache_report = build_cache(
            self.config.cache_dir, self.dataset, fingerprint, self._encode,
            lambda rows: self._loader(rows, self.dataset), self.accelerator, self.progress_bar)
        release_encoders(self.components, keep_on_cpu=bool(self.config.validation_prompts))

    def _loader(self, order: list[int], dataset=None):
        """The items of `order`, from the sample cache once there is one, read ahead by DataLoader workers if any."""
        if dataset is None:
            dataset = self.dataset if self.cached is None else self.cached
        if self.config.data.num_workers == 0:
            return (dataset[i] for i in order)
        return iter(torch.utils.data.DataLoader(dataset, sampler=order, batch_size=None, collate_fn=_identity,
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
            self._report(bar)
            losses, group = [], 0
            if config.save_steps is not None and self.progress.step % config.save_steps == 0:
                self.save(f"step-{self.progress.step}.safetensors")
            if self._validation_due():
                self._render_samples()
            if on_step is not None:
                on_step(self)
            self._clock = time.perf_counter()  # saving and rendering are not the next step's time
            if self.progress.step >= self.total_steps:
                return True
        return False

    def _report(self, bar) -> None:
        """The step's loss, learning rate, time and the device's peak memory to the progress bar and the logs."""
        record = self.history[-1]
        now = time.perf_counter()
        seconds, self._clock = now - self._clock, now
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        shown = {"loss": f"{record.loss:.4f}", "lr": f"{record.lr:.2e}", "s/step": f"{seconds:.2f}"}
        if peak is not None:
            shown["peak"] = f"{peak / 2**30:.1f}GiB"
        bar.update(1)
        bar.set_postfix(shown)
        if self.log is not None:
            self.log.step(record.step, record.loss, record.lr, seconds, peak)

    def _validation_due(self) -> bool:
        every, step = self.config.validation_steps, self.progress.step
        due = step >= self.total_steps or (every is not None and step % every == 0)
        return bool(self.config.validation_prompts) and due

    def _validation_conditions(self) -> tuple[dict, str | None]:
        """The extra inputs validation renders with: those of the dataset's first readable sample."""
        if not self.config.extra_inputs:
            return {}, None
        for index in range(len(self.dataset)):
            item = self.dataset[index]
            if not isinstance(item, Skipped):
                return validation_inputs(self.family, item, self.config), f"sample {index} ({item['prompt']!r})"
        return {}, None

    def _render_samples(self) -> None:
        """The validation images, on the main process; the others wait for it."""
        acc = self.accelerator
        if acc.is_main_process:
            conditions, source = self._validation_conditions()
            written = render_samples(self.components, acc.unwrap_model(self.model), self.config, self.progress.step,
                                     self.device, self.dtype, conditions, source)
            if self.log is not None:
                self.log.images(self.progress.step, [image for _, image in written])
        acc.wait_for_everyone()
