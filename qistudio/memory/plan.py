"""From a VRAM budget and the models' sizes, decide what stays on the GPU, what visits it, and what streams.

Design note. The pipeline runs in phases that each need one model: text encoding (text encoder), denoising (DiT),
VAE encode/decode (VAE). Given a budget in bytes, the plan is, in order of preference:
1. everything resident, if all weights plus the largest phase's activations fit;
2. else each model rests in host memory and is copied in for its phase ("offload"), and the small models that
   still fit beside every phase stay resident;
3. else a model too large for its phase streams its blocks: as many blocks as fit stay resident for the phase
   (spread evenly between streamed ones), the rest go through two device slots.
Budgets too small even for streaming raise an error naming the smallest budget that works. Activation sizes
are estimates for the reference workload (1328x1328, guidance batched: batch 2); the result is a plan, not a cap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1024**3
NUM_SLOTS = 2


@dataclass(frozen=True)
class ModelSize:
    """What the planner needs of one model."""

    total_bytes: int
    block_bytes: int = 0  # one block of the main streamable list (0: not streamable)
    num_blocks: int = 0
    activation_bytes: int = 0  # peak working memory of its phase
    other_block_bytes: int = 0  # blocks of further lists, always streamed in stream mode (the vision tower)
    other_slot_bytes: int = 0  # the device slots those need
    # All blocks of the main list; 0: block_bytes * num_blocks. Blocks of one list differ where a quantised file
    # stores some linears in more bits (Q4_K_M): block_bytes is the largest (what a slot holds), this their sum.
    main_blocks_bytes: int = 0

    @property
    def non_block_bytes(self) -> int:
        blocks = self.main_blocks_bytes or self.block_bytes * self.num_blocks
        return self.total_bytes - blocks - self.other_block_bytes


@dataclass
class ModelPlan:
    mode: str  # "resident" | "offload" | "stream"
    resident_blocks: int = 0  # stream mode: blocks kept on the device during the phase
    num_blocks: int = 0

    @property
    def streamed_blocks(self) -> int:
        return self.num_blocks - self.resident_blocks if self.mode == "stream" else 0


@dataclass
class MemoryPlan:
    budget_bytes: int
    models: dict[str, ModelPlan] = field(default_factory=dict)
    tiled_vae: bool = False

    def describe(self) -> str:
        parts = []
        for name, plan in self.models.items():
            detail = f" ({plan.resident_blocks}/{plan.num_blocks} blocks resident)" if plan.mode == "stream" else ""
            parts.append(f"{name}: {plan.mode}{detail}")
        return f"budget {self.budget_bytes / GiB:.1f} GiB: " + ", ".join(parts) + (", VAE tiled" if self.tiled_vae else "")


def smallest_budget(size: ModelSize) -> int:
    """The least memory in which a model's phase can run: non-block weights, two block slots, activations."""
    if size.num_blocks == 0:
        return size.total_bytes + size.activation_bytes
    return size.non_block_bytes + NUM_SLOTS * size.block_bytes + size.other_slot_bytes + size.activation_bytes


def plan_memory(budget_bytes: int, sizes: dict[str, ModelSize], vae_tiled_activation: int | None = None) -> MemoryPlan:
    """A plan for `sizes` (keyed by component name) within `budget_bytes` (0: the smallest footprint possible)."""
    plan = MemoryPlan(budget_bytes)
    minimal = budget_bytes == 0
    if "vae" in sizes and vae_tiled_activation is not None:
        vae = sizes["vae"]
        if minimal or vae.total_bytes + vae.activation_bytes > budget_bytes:
            plan.tiled_vae = True
            sizes = {**sizes, "vae": ModelSize(vae.total_bytes, activation_bytes=vae_tiled_activation)}
    peak_activation = max(s.activation_bytes for s in sizes.values())
    if not minimal and sum(s.total_bytes for s in sizes.values()) + peak_activation <= budget_bytes:
        plan.models = {name: ModelPlan("resident") for name in sizes}
        return plan

    if not minimal:
        name = max(sizes, key=lambda n: smallest_budget(sizes[n]))
        need = smallest_budget(sizes[name])
        if need > budget_bytes:
            raise ValueError(
                f"a VRAM budget of {budget_bytes / GiB:.2f} GiB cannot run the {name} ({sizes[name].total_bytes / GiB:.2f} "
                f"GiB of weights); the smallest workable budget is {need / GiB:.2f} GiB (or vram_limit=0 for the "
                "smallest footprint)"
            )
    for name, size in sizes.items():
        fits_whole = size.total_bytes + size.activation_bytes <= budget_bytes
        if (fits_whole and not minimal) or (minimal and size.num_blocks == 0):
            plan.models[name] = ModelPlan("offload")  # minimal: what cannot stream visits whole
            continue
        spare = 0 if minimal else budget_bytes - smallest_budget(size)
        resident = min(size.num_blocks, spare // size.block_bytes) if size.block_bytes else 0
        plan.models[name] = ModelPlan("stream", resident_blocks=int(resident), num_blocks=size.num_blocks)

    if not minimal:
        # Keep small offloaded models resident when they fit beside every other phase's needs.
        for name in sorted(sizes, key=lambda n: sizes[n].total_bytes):
            if plan.models[name].mode != "offload":
                continue
            kept = sum(sizes[n].total_bytes for n, p in plan.models.items() if p.mode == "resident")
            fits = all(
                kept + sizes[name].total_bytes + _phase_bytes(other, sizes[other], plan.models[other]) <= budget_bytes
                for other in sizes if other != name
            )  # fmt: skip
            if fits:
                plan.models[name] = ModelPlan("resident")
    return plan


def _phase_bytes(name: str, size: ModelSize, plan: ModelPlan) -> int:
    """Device memory a phase needs for its own model (beyond what is resident anyway)."""
    if plan.mode == "resident":
        return size.activation_bytes
    if plan.mode == "offload":
        return size.total_bytes + size.activation_bytes
    return smallest_budget(size) + plan.resident_blocks * size.block_bytes
