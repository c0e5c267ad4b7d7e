"""Turn the seed's VRAM controls (vram_limit, vram_buffer, num_persistent_param_in_dit, per-model offload dtype)
into a memory plan for a pipeline's loaded models."""

from __future__ import annotations

import torch

from .manager import VAE_TILED_ACTIVATION, model_size, streamable_blocks
from .plan import GiB, MemoryPlan, ModelPlan, plan_memory

FP8_DTYPES = (torch.float8_e4m3fn,)


def store_fp8(components) -> None:
    """Quantise the linears of every model whose ModelConfig asked for float8 storage (per-channel scales)."""
    requested = {name: dtype for name, (_, dtype) in components.offload.items()
                 if dtype in FP8_DTYPES and name not in components.disk_sources}  # disk blocks stay as stored
    if not requested:
        return  # other offload dtypes: the weights rest in the pipeline's dtype
    from .fp8_linear import dit_fp8_predicate, quantize_linears, text_encoder_fp8_predicate

    predicates = {"dit": dit_fp8_predicate, "text_encoder": text_encoder_fp8_predicate}
    for name, dtype in requested.items():
        if name in predicates:  # the VAE (0.25 GB of convolutions) keeps its dtype: FP8 would only cost quality
            quantize_linears(getattr(components, name), predicates[name])


def enable_fp8_compute(components, attention: bool = True, fast_accumulation: bool = True) -> None:
    """W8A8 for the DiT's block linears (quantised to FP8 storage first if they are not yet), and FP8 attention
    where cuDNN's FP8 kernel can run (nvidia-cudnn-frontend installed, Hopper or newer). fast_accumulation: the
    FP8 GEMMs' (FP8Linear.fast_accumulation)."""
    from ..ops.attention import set_fp8_attention
    from .fp8_linear import dit_fp8_predicate, quantize_linears, set_fp8_compute

    if "dit" in components.disk_sources:
        raise ValueError("FP8 computation needs the DiT's weights in memory; it cannot combine with "
                         "offload_device='disk' for the DiT")
    from .gguf_fp8 import fp8_compute_from_gguf

    fp8_compute_from_gguf(components.dit, dit_fp8_predicate)  # GGUF Q8_0 linears -> FP8 where the GPU has FP8
    quantize_linears(components.dit, dit_fp8_predicate)  # no-op when already quantised
    set_fp8_compute(components.dit, True, fast_accumulation)
    set_fp8_attention(components.dit, attention)


def device_budget(device: torch.device, vram_limit: float | None, vram_buffer: float) -> int | None:
    """Bytes to plan for: the limit, else the device's free memory less the buffer (None on the CPU: no limit)."""
    if vram_limit is not None:
        if vram_limit < 0:
            raise ValueError(f"vram_limit must be >= 0 GiB (0: the smallest footprint), got {vram_limit}")
        return int(vram_limit * GiB)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, int(free - vram_buffer * GiB))


def memory_plan_for(components, device, vram_limit, vram_buffer, num_persistent_param_in_dit,
                    enable_dit_fp8_computation) -> MemoryPlan:
    device = torch.device(device)
    store_fp8(components)
    if enable_dit_fp8_computation:
        enable_fp8_compute(components)
    models = components.models
    sizes = {name: model_size(name, model) for name, model in models.items()}
    budget = device_budget(device, vram_limit, vram_buffer)
    if budget is None:
        plan = MemoryPlan(0, {name: ModelPlan("resident") for name in models})
    else:
        plan = plan_memory(budget, sizes, VAE_TILED_ACTIVATION)
    for name in components.disk_sources:  # left in their files: the blocks stream, whatever the budget
        blocks = streamable_blocks(name, models[name])[0]
        plan.models[name] = ModelPlan("stream", resident_blocks=0, num_blocks=len(blocks))
    if num_persistent_param_in_dit is not None and "dit" in models and "dit" not in components.disk_sources:
        blocks = streamable_blocks("dit", models["dit"])[0]
        block_params = sum(p.numel() for p in blocks[0].parameters())
        other_params = sum(p.numel() for p in models["dit"].parameters()) - block_params * len(blocks)
        resident = max(0, min(len(blocks), (num_persistent_param_in_dit - other_params) // block_params))
        plan.models["dit"] = (ModelPlan("resident") if resident == len(blocks) and budget is None
                              else ModelPlan("stream", resident_blocks=int(resident), num_blocks=len(blocks)))
    return plan
