# DiffSynth-Studio's validate_lora/Qwen-Image-Layered.py, on qistudio: the LoRA of model_training/lora/
# Qwen-Image-Layered.sh on Qwen-Image-Layered, one picture split into three layers (qistudio takes diffusers'
# inputs: image=, layers=, resolution= 640 or 1024; the working size follows the image).
#
# Unset, the environment changes nothing. For a quick run (the tests run this file after a one-step training):
#   QISTUDIO_MODEL_BASE_PATH=DIR QISTUDIO_SKIP_DOWNLOAD=1  QISTUDIO_EXAMPLE_DEVICE=cpu
#   QISTUDIO_EXAMPLE_STEPS=2  QISTUDIO_EXAMPLE_CHECKPOINT=path/to/step-1.safetensors
import os

from PIL import Image, ImageDraw
from qistudio import QwenImagePipeline, ModelConfig
import torch

device = os.environ.get("QISTUDIO_EXAMPLE_DEVICE", "cuda")
num_inference_steps = int(os.environ.get("QISTUDIO_EXAMPLE_STEPS", "50"))
checkpoint = os.environ.get("QISTUDIO_EXAMPLE_CHECKPOINT", "models/train/Qwen-Image-Layered_lora/epoch-4.safetensors")

pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device=device,
    model_configs=[
        ModelConfig(model_id="Qwen/Qwen-Image-Layered", origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors"),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="text_encoder/model*.safetensors"),
        ModelConfig(model_id="Qwen/Qwen-Image-Layered", origin_file_pattern="vae/diffusion_pytorch_model.safetensors"),
    ],
    tokenizer_config=ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="tokenizer/"),
)
pipe.load_lora(pipe.dit, checkpoint)

# The original reads data/example_image_dataset/layer/image.png (864x480); a drawn poster of that size stands in.
poster = Image.new("RGBA", (864, 480), (120, 180, 235, 255))
draw = ImageDraw.Draw(poster)
draw.ellipse((620, 60, 760, 200), fill=(250, 210, 60, 255))
draw.polygon([(0, 480), (300, 260), (640, 480)], fill=(60, 140, 70, 255))
layers = pipe("a poster", image=poster, layers=3, resolution=640, seed=0, num_inference_steps=num_inference_steps)
for i, layer in enumerate(layers, start=1):
    layer.save(f"image_{i}.png")
