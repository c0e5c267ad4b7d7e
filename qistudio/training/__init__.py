"""Training for the Qwen-Image family: LoRA (peft) or full fine-tuning of the DiT or a Blockwise ControlNet, with the
reference's flow-matching loss and every condition of the seed's table (edit, context, ControlNet, EliGen).

    from qistudio.training import DataConfig, TrainConfig, Trainer
    config = TrainConfig(DataConfig("data/images", "data/images/metadata.csv"), lora_base_model="dit",
                         model_paths=(...,), output_path="models/train/my_lora")
    Trainer(config).run()

Files, in the order data flows: config (what a run is), data (metadata, image sizing, skipped samples), buckets
(same-size steps across processes), encode (a sample through the pipeline's own conditioning), cache (encoded
samples on disk, encoders freed), timesteps (sigma sampling and loss weights), loss (the Denoiser: DiT plus
ControlNets), adapters (LoRA injection, trained tensors out), lowmem (FP8 base, streamed frozen blocks), optim
(optimizers and LR schedules by name), lean_optim (bfloat16-moment AdamW, the step fused into the backward), outputs
(user-facing files), tree (nested state as safetensors, no pickle), checkpoint (atomic resume state), resume (a
checkpoint checked against the run, then restored), lock (one run per output folder), samples (validation images),
logs (TensorBoard, CSV), distributed (the process group, failures of other processes), fsdp (FSDP2: the DiT sharded
from the files), sharded_checkpoint (FSDP2 state on disk), zero (DeepSpeed), zero_load (ZeRO-3: the DiT partitioned
from the files), zero_state (ZeRO-1/2/3 optimizer state by parameter), models (loading), demo_data (the mini dataset
of `train --demo`), errors, loop (the Trainer).

Trainer and StepRecord are imported on first use, so the settings (config) and errors load without torch.
"""

from __future__ import annotations

from .config import DEFAULT_LORA_TARGETS, DataConfig, LossConfig, TrainConfig
from .errors import CheckpointSaveError, NonFiniteError, RunLockedError

__all__ = ["DEFAULT_LORA_TARGETS", "CheckpointSaveError", "DataConfig", "LossConfig", "NonFiniteError",
           "RunLockedError", "StepRecord", "TrainConfig", "Trainer"]


def __getattr__(name: str):
    if name in ("Trainer", "StepRecord"):
        from . import loop  # torch, accelerate and peft

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
