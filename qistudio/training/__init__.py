"""Training for the Qwen-Image DiT: LoRA (peft) or full fine-tuning with the reference's flow-matching loss.

    from qistudio.training import DataConfig, TrainConfig, Trainer
    config = TrainConfig(DataConfig("data/images", "data/images/metadata.csv"), lora_base_model="dit",
                         model_paths=(...,), output_path="models/train/my_lora")
    Trainer(config).run()

Files, in the order data flows: config (what a run is), data (metadata, image sizing, skipped samples), encode
(a sample through the pipeline's own conditioning), timesteps (sigma sampling and loss weights), loss, adapters
(LoRA injection, trained tensors out), optim (AdamW, LR schedules), outputs (user-facing files), checkpoint
(atomic resume state), models (loading), loop (the Trainer).
"""

from .checkpoint import CheckpointSaveError
from .config import DEFAULT_LORA_TARGETS, DataConfig, LossConfig, TrainConfig
from .loop import StepRecord, Trainer

__all__ = ["DEFAULT_LORA_TARGETS", "CheckpointSaveError", "DataConfig", "LossConfig", "StepRecord", "TrainConfig",
           "Trainer"]
