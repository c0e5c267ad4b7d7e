# DiffSynth-Studio's low-VRAM Qwen-Image-2512 example, on qistudio: only the import differs, and every component
# comes from the Qwen/Qwen-Image-2512 repository itself.
# The models rest in host memory (the DiT and text encoder stored in FP8 with per-channel scales); the planner
# keeps on the GPU what fits in its free memory and streams the DiT's other blocks, prefetching the next block
# while one computes. `vram_limit=` (GiB) sets a budget instead; 0 asks for the smallest footprint.
#
# Unset, the environment changes nothing. For a quick run (the tests run this file with a tiny model):
#   QISTUDIO_MODEL_BASE_PATH=DIR QISTUDIO_SKIP_DOWNLOAD=1  read DIR/Qwen/... instead of downloading
#   QISTUDIO_EXAMPLE_DEVICE=cpu  QISTUDIO_EXAMPLE_STEPS=2  QISTUDIO_EXAMPLE_SIZE=64
import os

from qistudio import QwenImagePipeline, ModelConfig
import torch

device = os.environ.get("QISTUDIO_EXAMPLE_DEVICE", "cuda")
num_inference_steps = int(os.environ.get("QISTUDIO_EXAMPLE_STEPS", "40"))
size = int(os.environ.get("QISTUDIO_EXAMPLE_SIZE", "1328"))

pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device=device,
    model_configs=[
        ModelConfig(model_id="Qwen/Qwen-Image-2512", origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="Qwen/Qwen-Image-2512", origin_file_pattern="text_encoder/model*.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="Qwen/Qwen-Image-2512", origin_file_pattern="vae/diffusion_pytorch_model.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
    ],
    tokenizer_config=ModelConfig(model_id="Qwen/Qwen-Image-2512", origin_file_pattern="tokenizer/"),
)
pipe.enable_vram_management()
prompt = "精致肖像，水下少女，蓝裙飘逸，发丝轻扬，光影透澈，气泡环绕，面容恬静，细节精致，梦幻唯美。"
image = pipe(prompt, seed=0, num_inference_steps=num_inference_steps, height=size, width=size)
image.save("image.jpg")
print({phase: f"{peak / 2**30:.2f} GiB" for phase, peak in pipe.memory_report.items()})  # peak per phase (GPU)
