"""Training in little device memory: the frozen DiT base stored in FP8 (--fp8_base), frozen DiT blocks streamed
through the device within a budget (--vram_limit GiB).

Design note. Both act on the DiT after the LoRA is injected and before the optimizer exists, and both need the
base frozen (a LoRA on the DiT, or a ControlNet training beside it); full DiT training is refused.
- FP8: every linear of the blocks (the peft layers' `base_layer`s, never the LoRA factors) becomes a
  memory.fp8_linear.FP8Linear, per-channel scales, computing in the model's dtype. peft's layer keeps calling
  `base_layer(x)`, so parameter names, the LoRA and the saved files are those of the normal path. Blocks are
  quantised one at a time on the device (the DiT is loaded into host memory when either option is on).
- Streaming: a plan (memory.plan.plan_memory, the inference planner) from the budget, the blocks' frozen bytes,
  the LoRA's training state (weights, gradients, AdamW's two moments) and an activation estimate says how many
  blocks stay resident; the others keep their frozen tensors in pinned host memory and pass through two device
  slots in the forward and again, in reverse, in the backward (memory.training_stream). LoRA factors and the
  optimizer state stay on the device. Streaming needs gradient checkpointing. With several processes (DDP) each
  streams its own copy: DDP is told to leave the frozen tensors alone (distributed.ignore_frozen).

The activation estimate is for the largest sample the data settings allow: with checkpointing, every block's
input (image and text tokens) is kept for the backward, and one block's recompute and backward work at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..memory.fp8_linear import FP8_DTYPE, quantize_linears
from ..memory.offload import FlatWeights, spread
from ..memory.plan import GiB, MemoryPlan, ModelSize, plan_memory
from ..memory.training_stream import TrainingBlockStreamer
from .config import TrainConfig

logger = logging.getLogger(__name__)

TEXT_TOKENS = 256  # a generous prompt length for the estimate (templates dropped)
# One block's recompute and backward at a time, in (tokens x width) tensors of the compute dtype, plus what the
# caching allocator reserves beyond what is allocated. Calibrated on the full-size DiT (bench/train_step.py, H100,
# 1024x1024, FP8 base, LoRA rank 32, budget 16 GiB: 27 of 60 blocks resident, peak 14.5 GiB allocated and 16.0 GiB
# reserved), so that the reserved memory, not only the allocated, stays within the budget.
BLOCK_WORKING_TENSORS = 48
WORKSPACE = GiB // 2  # kernels' workspaces


def _is_lora(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def _frozen_linear(name: str, module: nn.Module) -> bool:
    """The block linears FP8 stores: every one but the LoRA factors."""
    return not _is_lora(name)


def _trainable_modules(module: nn.Module) -> tuple[nn.Module, ...]:
    """Submodules holding a trainable tensor of their own (the LoRA factors): these never stream."""
    return tuple(m for m in module.modules() if any(p is not None and p.requires_grad for p in m._parameters.values()))


def wants_low_memory(config: TrainConfig) -> bool:
    return config.fp8_base or config.vram_limit is not None


def load_device(config: TrainConfig, device: torch.device) -> torch.device:
    """Where to load the models: host memory when the DiT is to be placed piece by piece (FP8, streaming)."""
    return torch.device("cpu") if wants_low_memory(config) else device


def sample_tokens(config: TrainConfig, images: int | None = None) -> int:
    """Image tokens of the largest sample the data settings allow: the target plus any edit or context image (or
    `images` in all, the family's count: Layered's frames and input image, 2.1's edit images), each taken at the
    target's size."""
    data = config.data
    pixels = data.height * data.width if data.height is not None else data.max_pixels
    if images is None:
        images = 1 + sum(key in ("edit_image", "context_image") for key in config.extra_inputs)
    return images * pixels // 256  # one token per 16x16 pixels


def activation_bytes(dit: nn.Module, image_tokens: int, text_tokens: int = TEXT_TOKENS) -> int:
    """Estimated device memory of a checkpointed training step's activations (the weights not included)."""
    cfg = dit.config
    element = dit.img_in.weight.element_size()
    stream = (image_tokens + text_tokens) * cfg.dim * element  # one (tokens, width) tensor
    return cfg.num_layers * stream + BLOCK_WORKING_TENSORS * stream + WORKSPACE


def _lora_state_bytes(dit: nn.Module) -> int:
    # AdamW: the weights, their gradients and two moments, all in the weights' dtype.
    return 4 * sum(p.numel() * p.element_size() for p in dit.parameters() if p.requires_grad)


def _frozen_bytes(module: nn.Module, fp8: bool) -> int:
    """Bytes of the frozen tensors of `module`, with its linears counted as FP8 (weight + scales) when `fp8`."""
    total = 0
    for name, sub in module.named_modules():
        quantised = fp8 and isinstance(sub, nn.Linear) and not _is_lora(name) and not sub.weight.requires_grad
        for key, tensor in [*sub._parameters.items(), *sub._buffers.items()]:
            if tensor is None or tensor.requires_grad:
                continue
            if quantised and key == "weight":
                total += tensor.numel() * torch.empty((), dtype=FP8_DTYPE).element_size() + tensor.shape[0] * 4
            else:
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class LowMemory:
    """What was done to the DiT: FP8 layers, the plan and the streamer (None: every block resident)."""

    fp8_layers: int
    plan: MemoryPlan | None
    streamer: TrainingBlockStreamer | None
    num_blocks: int

    @property
    def device_placement(self) -> list[bool | None] | None:
        """For accelerate's prepare(model, optimizer): the model is placed already (streamed parts in host memory)."""
        return None if self.streamer is None else [False, None]

    def describe(self) -> str:
        parts = [f"FP8 base ({self.fp8_layers} block linears)"] if self.fp8_layers else []
        if self.plan is not None:
            detail = "every block resident"
            if self.streamer is not None:
                detail = (f"{len(self.streamer.streamed)} of {self.num_blocks} blocks streamed "
                          f"({self.streamer.streamed_bytes / GiB:.2f} GiB each way per step)")
            parts.append(f"VRAM budget {self.plan.budget_bytes / GiB:.1f} GiB: {detail}")
        return "; ".join(parts)


def check_frozen_base(dit: nn.Module) -> None:
    trained = [name for name, p in dit.named_parameters() if p.requires_grad and not _is_lora(name)]
    if trained:
        raise ValueError(f"fp8_base and vram_limit keep the DiT's base frozen, but {len(trained)} of its tensors train "
                         f"(first: {trained[0]}); train a LoRA on it (--lora_base_model dit) instead")


def plan_blocks(dit: nn.Module, vram_limit: float, fp8: bool, image_tokens: int) -> MemoryPlan:
    """How many of the DiT's blocks stay resident within `vram_limit` GiB (0: stream every block)."""
    if vram_limit < 0:
        raise ValueError(f"vram_limit must be >= 0 GiB (0: stream every block), got {vram_limit}")
    blocks = dit.transformer_blocks
    block_bytes = [_frozen_bytes(b, fp8) for b in blocks]
    size = ModelSize(
        total_bytes=_frozen_bytes(dit, False) - sum(_frozen_bytes(b, False) for b in blocks) + sum(block_bytes),
        block_bytes=max(block_bytes), num_blocks=len(blocks),
        activation_bytes=activation_bytes(dit, image_tokens) + _lora_state_bytes(dit),
    )  # fmt: skip
    try:
        return plan_memory(int(vram_limit * GiB), {"dit": size})
    except ValueError as e:
        raise ValueError(f"training within vram_limit={vram_limit:g}: {e}") from None


def prepare_dit(dit: nn.Module, device, fp8: bool, vram_limit: float | None, image_tokens: int) -> LowMemory:
    """Quantise the frozen block linears (fp8) and stream the blocks the budget cannot hold; the LoRA is injected
    and the DiT's gradient_checkpointing set already. Leaves everything not streamed on `device`."""
    check_frozen_base(dit)
    plan, streamed = None, []
    if vram_limit is not None:
        plan = plan_blocks(dit, vram_limit, fp8, image_tokens)
        streamed = spread(len(dit.transformer_blocks), plan.models["dit"].streamed_blocks)
    fp8_layers, streamer = place_dit(dit, device, fp8, streamed)
    return LowMemory(fp8_layers, plan, streamer, len(dit.transformer_blocks))


def place_dit(dit: nn.Module, device, fp8: bool, streamed: list[int]) -> tuple[int, TrainingBlockStreamer | None]:
    """FP8 block linears (fp8), the `streamed` blocks' frozen tensors in host memory behind a streamer, the rest
    on `device`; returns (FP8 layers made, the attached streamer or None)."""
    device = torch.device(device)
    blocks = dit.transformer_blocks
    if streamed and not dit.gradient_checkpointing:
        raise ValueError("vram_limit streams DiT blocks, which needs gradient checkpointing "
                         "(--use_gradient_checkpointing): each block's weights are read again in the backward")
    fp8_layers, weights = 0, {}
    for index, block in enumerate(blocks):
        if fp8 or index not in streamed:
            block.to(device)  # quantising on the device is fast; the bf16 block is there for a moment only
        if fp8:
            fp8_layers += quantize_linears(block, _frozen_linear)
        if index in streamed:
            # Its frozen tensors move to pinned host memory; the LoRA factors stay behind, on the device.
            weights[index] = FlatWeights(block, pin=device.type == "cuda", exclude=_trainable_modules(block))
            for module in _trainable_modules(block):
                module.to(device)
    for child in dit.children():
        if child is not blocks:
            child.to(device)
    streamer = None
    if streamed:
        streamer = TrainingBlockStreamer(blocks, device, streamed, weights,
                                         checkpointed=lambda: dit.gradient_checkpointing).attach()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return fp8_layers, streamer


def setup_low_memory(components, config: TrainConfig, device, images: int | None = None) -> LowMemory | None:
    """The Trainer's hook: the DiT made to fit (FP8, streaming), the other models moved to `device` (the models
    were loaded into host memory, see load_device). None when neither option is on. `images`: sample_tokens'."""
    if not wants_low_memory(config):
        return None
    low_memory = prepare_dit(components.dit, device, config.fp8_base, config.vram_limit, sample_tokens(config, images))
    for model in (components.vae, components.text_encoder, *components.controlnets):
        model.to(device)
    logger.info("low-memory training: %s", low_memory.describe())
    return low_memory
