# Qwen-Image-Layered on qistudio with low VRAM: as model_inference/Qwen-Image-Layered.py, the models resting in
# host memory (the DiT and text encoder stored in FP8 with per-channel scales); the planner keeps on the GPU what
# fits and streams the DiT's other blocks. `vram_limit=` (GiB) sets a budget instead; 0: the smallest footprint.
#
# Unset, the environment changes nothing. For a quick run (the tests run this file with a tiny model):
#   QISTUDIO_MODEL_BASE_PATH=DIR QISTUDIO_SKIP_DOWNLOAD=1  read DIR/Qwen/Qwen-Image-Layered/... instead of downloading
#   QISTUDIO_EXAMPLE_DEVICE=cpu  QISTUDIO_EXAMPLE_STEPS=2
import os

from qistudio import QwenImagePipeline, ModelConfig
from qistudio.conditioning.layered import composite
from PIL import Image, ImageDraw
import torch

device = os.environ.get("QISTUDIO_EXAMPLE_DEVICE", "cuda")
num_inference_steps = int(os.environ.get("QISTUDIO_EXAMPLE_STEPS", "50"))
offload = dict(offload_device="cpu", offload_dtype=torch.float8_e4m3fn)

pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device=device,
    model_configs=[
        ModelConfig(model_id="Qwen/Qwen-Image-Layered", origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors", **offload),
        ModelConfig(model_id="Qwen/Qwen-Image-Layered", origin_file_pattern="text_encoder/model*.safetensors", **offload),
        ModelConfig(model_id="Qwen/Qwen-Image-Layered", origin_file_pattern="vae/diffusion_pytorch_model.safetensors", **offload),
    ],
    tokenizer_config=ModelConfig(model_id="Qwen/Qwen-Image-Layered", origin_file_pattern="tokenizer/"),
    processor_config=ModelConfig(model_id="Qwen/Qwen-Image-Layered", origin_file_pattern="processor/"),
)
pipe.enable_vram_management()
poster = Image.new("RGBA", (864, 480), (120, 180, 235, 255))
draw = ImageDraw.Draw(poster)
draw.ellipse((620, 60, 760, 200), fill=(250, 210, 60, 255))
draw.polygon([(0, 480), (300, 260), (640, 480)], fill=(60, 140, 70, 255))
draw.text((80, 80), "HELLO!", fill=(200, 30, 30, 255), font_size=72)

prompt = 'A poster: a yellow sun in a blue sky above a green hill, the word "HELLO!" in bold red letters.'
layers = pipe(prompt, image=poster, layers=4, resolution=640, seed=1, num_inference_steps=num_inference_steps)
for i, layer in enumerate(layers, start=1):
    layer.save(f"layer_{i}.png")
composite(layers).save("composite.png")
print({phase: f"{peak / 2**30:.2f} GiB" for phase, peak in pipe.memory_report.items()})  # peak per phase (GPU)
