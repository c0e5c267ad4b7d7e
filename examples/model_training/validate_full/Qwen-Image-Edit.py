# DiffSynth-Studio's validate_full/Qwen-Image-Edit.py, on qistudio:
# The fully trained Edit DiT (in place of Qwen-Image-Edit's), one edit.
#
# The images come from the seed's example dataset:
#   modelscope download --dataset DiffSynth-Studio/example_image_dataset --local_dir ./data/example_image_dataset
#
# Unset, the environment changes nothing. For a quick run (the tests run this file after a one-step training):
#   QISTUDIO_MODEL_BASE_PATH=DIR QISTUDIO_SKIP_DOWNLOAD=1  QISTUDIO_EXAMPLE_DEVICE=cpu
#   QISTUDIO_EXAMPLE_STEPS=2  QISTUDIO_EXAMPLE_SIZE=64  QISTUDIO_EXAMPLE_CHECKPOINT=path/to/step-1.safetensors
import os

from PIL import Image
from qistudio import QwenImagePipeline, ModelConfig
import torch

device = os.environ.get("QISTUDIO_EXAMPLE_DEVICE", "cuda")
num_inference_steps = int(os.environ.get("QISTUDIO_EXAMPLE_STEPS", "40"))
size = int(os.environ.get("QISTUDIO_EXAMPLE_SIZE", "1024"))
checkpoint = os.environ.get("QISTUDIO_EXAMPLE_CHECKPOINT", "models/train/Qwen-Image-Edit_full/epoch-1.safetensors")

pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device=device,
    model_configs=[
        ModelConfig(path=checkpoint),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="text_encoder/model*.safetensors"),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="vae/diffusion_pytorch_model.safetensors"),
    ],
    tokenizer_config=None,  # the processor's tokenizer serves text prompts too
    processor_config=ModelConfig(model_id="Qwen/Qwen-Image-Edit", origin_file_pattern="processor/"),
)

image = Image.open("data/example_image_dataset/edit/image1.jpg").resize((size, size))
image = pipe("将裙子改为粉色", edit_image=image, seed=0, num_inference_steps=num_inference_steps, height=size, width=size)
image.save("image.jpg")
