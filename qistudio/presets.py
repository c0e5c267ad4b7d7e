"""Published members of the family and their few-step LoRAs, as data: hub ids, files, schedule, steps, guidance.

Every entry names where its numbers were published; nothing here is guessed. A preset is used as

    preset = LORA_PRESETS["Qwen-Image-2512-Lightning-4steps"]
    pipe.load_lora(pipe.dit, preset.lora_config())
    pipe.scheduler = FlowMatchScheduler(preset.scheduler)
    image = pipe(prompt, num_inference_steps=preset.steps, cfg_scale=preset.cfg_scale)
"""

from __future__ import annotations

from dataclasses import dataclass

from .weights.model_config import ModelConfig

LIGHTNING_README = "github.com/ModelTC/Qwen-Image-Lightning README.md and generate_with_diffusers.py"


@dataclass(frozen=True)
class ModelPreset:
    """A base model: its hub repository (every component in the diffusers layout) and its published defaults."""

    model_id: str
    steps: int
    cfg_scale: float
    negative_prompt: str
    source: str

    def model_configs(self, **hub) -> list[ModelConfig]:
        """DiT, text encoder and VAE from the model's own repository (its own files, not Qwen/Qwen-Image's)."""
        return [ModelConfig(model_id=self.model_id, origin_file_pattern=pattern, **hub) for pattern in (
            "transformer/diffusion_pytorch_model*.safetensors", "text_encoder/model*.safetensors",
            "vae/diffusion_pytorch_model.safetensors")]

    def tokenizer_config(self, **hub) -> ModelConfig:
        return ModelConfig(model_id=self.model_id, origin_file_pattern="tokenizer/", **hub)


@dataclass(frozen=True)
class LoRAPreset:
    """A distilled LoRA: the base model it was trained on, its file, and the sampling it was distilled for."""

    base_model: str
    repository: str
    file: str
    scheduler: str  # a qistudio.sampling.schedule.FlowMatchScheduler template
    steps: int
    cfg_scale: float
    source: str

    def lora_config(self, **hub) -> ModelConfig:
        return ModelConfig(model_id=self.repository, origin_file_pattern=self.file, **hub)


# Qwen-Image-2512 (2025-12-31): the base model retrained, same architecture and layout as Qwen/Qwen-Image.
# lightx2v evaluates its base at 50 steps, true CFG 4, with this negative prompt (generate_with_diffusers.py picks
# it for any "Qwen-Image-2512" model); DiffSynth-Studio's example runs 40 steps.
QWEN_IMAGE_2512_NEGATIVE = ("低分辨率，低画质，肢体畸形，手指畸形，画面过饱和，蜡像感，人脸无细节，过度光滑，画面具有AI感。构图混乱。"
                            "文字模糊，扭曲。")
MODEL_PRESETS = {
    "Qwen/Qwen-Image-2512": ModelPreset("Qwen/Qwen-Image-2512", 50, 4.0, QWEN_IMAGE_2512_NEGATIVE,
                                        f"{LIGHTNING_README} (\"Run base Qwen-Image-2512 Model\": 50 steps, cfg 4.0)"),
}

# The Lightning LoRAs were distilled at a fixed shift of 3: base_shift = max_shift = ln 3, no shift terminal
# (generate_with_diffusers.py's scheduler_config), i.e. the "Qwen-Image-Lightning" template; cfg 1 (no guidance).
LORA_PRESETS = {
    "Qwen-Image-2512-Lightning-4steps": LoRAPreset(
        "Qwen/Qwen-Image-2512", "lightx2v/Qwen-Image-2512-Lightning",
        "Qwen-Image-2512-Lightning-4steps-V1.0-bf16.safetensors", "Qwen-Image-Lightning", 4, 1.0,
        f"{LIGHTNING_README}: released 2026-01-01 (fp32 and bf16 files), \"Run 4-step Qwen-Image-2512 Model\": "
        "4 steps, cfg 1.0"),
    "Qwen-Image-Edit-2511-Lightning-4steps": LoRAPreset(
        "Qwen/Qwen-Image-Edit-2511", "lightx2v/Qwen-Image-Edit-2511-Lightning",
        "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors", "Qwen-Image-Lightning", 4, 1.0,
        f"{LIGHTNING_README}: released 2025-12-22, \"Run 4-step Edit-2511 Model\": 4 steps, cfg 1.0"),
    "Qwen-Image-Lightning-4steps": LoRAPreset(
        "Qwen/Qwen-Image", "lightx2v/Qwen-Image-Lightning", "Qwen-Image-Lightning-4steps-V2.0-bf16.safetensors",
        "Qwen-Image-Lightning", 4, 1.0, f"{LIGHTNING_README}: 4steps-V2.0 released 2025-09-10"),
    "Qwen-Image-Lightning-8steps": LoRAPreset(
        "Qwen/Qwen-Image", "lightx2v/Qwen-Image-Lightning", "Qwen-Image-Lightning-8steps-V2.0-bf16.safetensors",
        "Qwen-Image-Lightning", 8, 1.0, f"{LIGHTNING_README}: 8steps-V2.0 released 2025-09-12"),
}  # fmt: skip


def lora_preset(name: str) -> LoRAPreset:
    """The preset called `name`; an unknown name is one error listing the known ones."""
    if name not in LORA_PRESETS:
        raise ValueError(f"unknown LoRA preset {name!r}; known: {', '.join(sorted(LORA_PRESETS))}")
    return LORA_PRESETS[name]
