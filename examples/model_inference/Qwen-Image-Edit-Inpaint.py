# Edit inpainting on qistudio: Qwen-Image-Edit repaints only the masked region of the image it edits (white =
# repaint), the rest kept as it was; diffusers' QwenImageEditInpaintPipeline, as inputs of the one pipeline:
# edit_image + inpaint_mask (+ denoising_strength to keep some of the masked region's content).
#
# Unset, the environment changes nothing. For a quick run (the tests run this file with a tiny model):
#   QISTUDIO_MODEL_BASE_PATH=DIR QISTUDIO_SKIP_DOWNLOAD=1  read DIR/Qwen/... instead of downloading
#   QISTUDIO_EXAMPLE_DEVICE=cpu  QISTUDIO_EXAMPLE_STEPS=2  QISTUDIO_EXAMPLE_SIZE=64
import os

from qistudio import QwenImagePipeline, ModelConfig
from PIL import Image, ImageDraw
import torch

device = os.environ.get("QISTUDIO_EXAMPLE_DEVICE", "cuda")
num_inference_steps = int(os.environ.get("QISTUDIO_EXAMPLE_STEPS", "40"))
scale = int(os.environ.get("QISTUDIO_EXAMPLE_SIZE", "1328")) / 1328

pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device=device,
    model_configs=[
        ModelConfig(model_id="Qwen/Qwen-Image-Edit", origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors"),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="text_encoder/model*.safetensors"),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="vae/diffusion_pytorch_model.safetensors"),
    ],
    tokenizer_config=None,  # the processor's tokenizer serves text prompts too
    processor_config=ModelConfig(model_id="Qwen/Qwen-Image-Edit", origin_file_pattern="processor/"),
)
height, width = round(1328 * scale) // 16 * 16, round(1024 * scale) // 16 * 16
prompt = "精致肖像，水下少女，蓝裙飘逸，发丝轻扬，光影透澈，气泡环绕，面容恬静，细节精致，梦幻唯美。"
input_image = pipe(prompt=prompt, seed=0, num_inference_steps=num_inference_steps, height=height, width=width)
input_image.save("image1.jpg")

# Repaint the lower half only (the skirt); the mask may have any size, it is resized to the edit image's.
mask = Image.new("L", input_image.size, 0)
ImageDraw.Draw(mask).rectangle((0, input_image.height // 2, input_image.width, input_image.height), fill=255)
image = pipe("将裙子改为粉色", edit_image=input_image, inpaint_mask=mask, seed=1, num_inference_steps=num_inference_steps)
image.save("image2.jpg")  # the edit image's working size (about 1024x1024 pixels, its aspect ratio)
