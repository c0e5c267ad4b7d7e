# DiffSynth-Studio's Qwen-Image-Blockwise-ControlNet-Inpaint example, on qistudio, low-VRAM: only the import differs (and
# the image and mask are made here instead of downloaded). The Inpaint ControlNet sees the image with the region
# blacked out plus the mask; the pipeline-level input_image + inpaint_mask keep everything outside it.
# Models rest in host memory (DiT and text encoder in FP8) and visit the GPU for their phase.
#
# Unset, the environment changes nothing. For a quick run (the tests run this file with a tiny model):
#   QISTUDIO_MODEL_BASE_PATH=DIR QISTUDIO_SKIP_DOWNLOAD=1  read DIR/<repo>/... instead of downloading
#   QISTUDIO_EXAMPLE_DEVICE=cpu  QISTUDIO_EXAMPLE_STEPS=2  QISTUDIO_EXAMPLE_SIZE=64
import os

from qistudio import QwenImagePipeline, ModelConfig, ControlNetInput
from PIL import Image, ImageDraw
import torch

device = os.environ.get("QISTUDIO_EXAMPLE_DEVICE", "cuda")
num_inference_steps = int(os.environ.get("QISTUDIO_EXAMPLE_STEPS", "40"))
size = int(os.environ.get("QISTUDIO_EXAMPLE_SIZE", "1328"))

pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device=device,
    model_configs=[
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="text_encoder/model*.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="vae/diffusion_pytorch_model.safetensors", offload_device="cpu"),
        ModelConfig(model_id="DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Inpaint", origin_file_pattern="model.safetensors"),
    ],
    tokenizer_config=ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="tokenizer/"),
)
pipe.enable_vram_management()
source = pipe("窗边的木桌上放着一个空花瓶", seed=0, num_inference_steps=num_inference_steps, height=size, width=size)
source.save("image_source.jpg")
mask = Image.new("RGB", (size, size))
ImageDraw.Draw(mask).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(255, 255, 255))
mask.save("image_mask.jpg")
image = pipe(
    "窗边的木桌上放着一束向日葵", seed=1, num_inference_steps=num_inference_steps, height=size, width=size,
    input_image=source, inpaint_mask=mask,
    blockwise_controlnet_inputs=[ControlNetInput(image=source, inpaint_mask=mask)],
)
image.save("image.jpg")
