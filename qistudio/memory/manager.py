"""Carry out a memory plan over a pipeline's models, phase by phase, and report each phase's peak.

The pipeline only says which phase it is in (`with manager.phase("denoise", "dit"):`); the manager copies that
phase's model in (whole, or its resident part with the rest streaming block by block), sends the others back to
host memory, and records the phase's peak device memory.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from ..models.packed_linears import release_packed
from .disk import DiskBlockWeights, DiskSource
from .mapped import MappedWeights, rests_in_place
from .offload import BlockStreamer, ModelOffload, spread
from .plan import NUM_SLOTS, GiB, MemoryPlan, ModelSize

# Activation estimates for the reference workload (1328x1328, batch 2 with guidance batched), in bytes.
DIT_ACTIVATION = int(1.5 * GiB)
TEXT_ENCODER_ACTIVATION = int(0.5 * GiB)
VAE_ACTIVATION = 6 * GiB
VAE_TILED_ACTIVATION = 1 * GiB


def streamable_blocks(name: str, model: nn.Module) -> list[nn.ModuleList]:
    """The lists of repeated blocks that carry almost all of a model's weights; the first is the main one."""
    if name == "dit":
        return [model.transformer_blocks]
    if name == "text_encoder":
        return [model.model.language_model.layers, model.model.visual.blocks]
    return []


def model_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def model_size(name: str, model: nn.Module) -> ModelSize:
    activation = {"dit": DIT_ACTIVATION, "text_encoder": TEXT_ENCODER_ACTIVATION, "vae": VAE_ACTIVATION}[name]
    lists = [blocks for blocks in streamable_blocks(name, model) if len(blocks)]
    if not lists:
        return ModelSize(model_bytes(model), activation_bytes=activation)
    main, others = lists[0], lists[1:]
    return ModelSize(
        model_bytes(model), max(model_bytes(b) for b in main), len(main), activation,
        other_block_bytes=sum(model_bytes(b) for blocks in others for b in blocks),
        other_slot_bytes=sum(NUM_SLOTS * max(model_bytes(b) for b in blocks) for blocks in others),
        main_blocks_bytes=sum(model_bytes(b) for b in main),
    )  # fmt: skip


def _disk_weights(model: nn.Module, blocks: nn.ModuleList, streamed: list[int], disk: DiskSource) -> dict:
    names = {id(m): n for n, m in model.named_modules()}
    return {i: DiskBlockWeights(blocks[i], names[id(blocks[i])] + ".", disk) for i in streamed}


class MemoryManager:
    def __init__(self, models: dict[str, nn.Module], device, plan: MemoryPlan,
                 disk_sources: dict[str, DiskSource] | None = None):
        self.device = torch.device(device)
        self.plan = plan
        self.offloads: dict[str, ModelOffload] = {}
        self.streamers: dict[str, list[BlockStreamer]] = {}
        self.report: dict[str, int] = {}
        for name, model_plan in plan.models.items():
            model = models[name]
            release_packed(model)  # offloading re-points the weights: no packed copy may stay on the device
            if model_plan.mode == "resident":
                model.to(self.device)
                continue
            exclude: list[nn.Module] = []
            in_place = rests_in_place(model)  # quantised: the weights stay views of their file, no pinned copy
            if model_plan.mode == "stream":
                self.streamers[name] = []
                disk = (disk_sources or {}).get(name)
                for k, blocks in enumerate(streamable_blocks(name, model)):
                    # The main list keeps the planned number resident; further lists (small) stream whole, and
                    # blocks left in their files always stream.
                    count = model_plan.streamed_blocks if k == 0 and disk is None else len(blocks)
                    streamed = spread(len(blocks), count)
                    exclude += [blocks[i] for i in streamed]
                    weights = None if disk is None else _disk_weights(model, blocks, streamed, disk)
                    if weights is None and in_place:
                        weights = {i: MappedWeights(blocks[i]) for i in streamed}
                    self.streamers[name].append(BlockStreamer(blocks, self.device, streamed, weights=weights).attach())
            self.offloads[name] = ModelOffload(model, self.device, exclude=tuple(exclude),
                                               weights=MappedWeights(model, tuple(exclude)) if in_place else None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def tiled_vae(self) -> bool:
        return self.plan.tiled_vae

    @contextmanager
    def phase(self, phase: str, model_name: str):
        """Run `phase` with `model_name` on the device; records the phase's peak in `report` (bytes)."""
        for name, offload in self.offloads.items():
            if name != model_name:
                offload.offload()
        if model_name in self.offloads:
            self.offloads[model_name].onload()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        yield
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            self.report[phase] = max(self.report.get(phase, 0), peak)

    def teardown(self) -> None:
        """Undo the plan: hooks removed, every managed weight in host memory (the caller re-plans or moves them)."""
        for streamers in self.streamers.values():
            for streamer in streamers:
                streamer.detach()
        self.release()

    def release(self) -> None:
        """Send every offloaded model back to host memory (the end of a call)."""
        for offload in self.offloads.values():
            offload.offload()
        for streamers in self.streamers.values():
            for streamer in streamers:
                streamer.forget_prefetch()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
