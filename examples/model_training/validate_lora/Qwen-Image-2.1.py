# The LoRA of model_training/lora/Qwen-Image-2.1.sh on Qwen-Image 2.1, one image (RGBA; 40 steps without guidance,
# 2.1's defaults).
#
# Unset, the environment changes nothing. For a quick run (the tests run this file after a one-step training):
#   QISTUDIO_MODEL_BASE_PATH=DIR QISTUDIO_SKIP_DOWNLOAD=1  QISTUDIO_EXAMPLE_DEVICE=cpu
#   QISTUDIO_EXAMPLE_STEPS=2  QISTUDIO_EXAMPLE_SIZE=64  QISTUDIO_EXAMPLE_CHECKPOINT=path/to/step-1.safetensors
import os

from qistudio import QwenImagePipeline, ModelConfig
import torch

device = os.environ.get("QISTUDIO_EXAMPLE_DEVICE", "cuda")
num_inference_steps = int(os.environ.get("QISTUDIO_EXAMPLE_STEPS", "40"))
size = int(os.environ.get("QISTUDIO_EXAMPLE_SIZE", "1024"))
checkpoint = os.environ.get("QISTUDIO_EXAMPLE_CHECKPOINT", "models/train/Qwen-Image-2.1_lora/epoch-4.safetensors")

pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device=device,
    model_configs=[
        ModelConfig(model_id="Qwen/Qwen-Image-2.1", origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors"),
        ModelConfig(model_id="Qwen/Qwen-Image-2.1", origin_file_pattern="text_encoder/model*.safetensors"),
        ModelConfig(model_id="Qwen/Qwen-Image-2.1", origin_file_pattern="vae/diffusion_pytorch_model.safetensors"),
    ],
    tokenizer_config=None,  # 2.1 reads prompts through its Qwen3-VL processor
    processor_config=ModelConfig(model_id="Qwen/Qwen-Image-2.1", origin_file_pattern="processor/"),
)
pipe.load_lora(pipe.dit, checkpoint)
image = pipe("a dog", seed=0, num_inference_steps=num_inference_steps, height=size, width=size)
image.save("image.png")
