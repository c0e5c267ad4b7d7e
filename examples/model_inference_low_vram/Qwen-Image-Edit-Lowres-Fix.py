# DiffSynth-Studio's Qwen-Image-Edit-Lowres-Fix example, on qistudio, low-VRAM: only the import differs.
# Models rest in host memory (DiT and text encoder stored in FP8) and visit the GPU for their phase; the DiT's
# blocks that do not fit stream in while the previous one computes (see model_inference_low_vram/Qwen-Image.py).
# A LoRA for Qwen-Image-Edit that edits from a low-resolution image: the edit image keeps its small size
# (edit_image_auto_resize=False) and its RoPE positions are sampled from the output's grid
# (edit_rope_interpolation=True), so it spans the whole output.
#
# Unset, the environment changes nothing. For a quick run (the tests run this file with a tiny model):
#   QISTUDIO_MODEL_BASE_PATH=DIR QISTUDIO_SKIP_DOWNLOAD=1  read DIR/<repo>/... instead of downloading
#   QISTUDIO_EXAMPLE_DEVICE=cpu  QISTUDIO_EXAMPLE_STEPS=2  QISTUDIO_EXAMPLE_SIZE=64
import os

from qistudio import QwenImagePipeline, ModelConfig
import torch

device = os.environ.get("QISTUDIO_EXAMPLE_DEVICE", "cuda")
num_inference_steps = int(os.environ.get("QISTUDIO_EXAMPLE_STEPS", "40"))
scale = int(os.environ.get("QISTUDIO_EXAMPLE_SIZE", "1024")) / 1024

pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device=device,
    model_configs=[
        ModelConfig(model_id="Qwen/Qwen-Image-Edit", origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="text_encoder/model*.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="vae/diffusion_pytorch_model.safetensors", offload_device="cpu"),
    ],
    tokenizer_config=None,
    processor_config=ModelConfig(model_id="Qwen/Qwen-Image-Edit", origin_file_pattern="processor/"),
)
pipe.enable_vram_management()
lora = ModelConfig(model_id="DiffSynth-Studio/Qwen-Image-Edit-Lowres-Fix", origin_file_pattern="model.safetensors")
pipe.load_lora(pipe.dit, lora)

# A low-resolution picture to start from (any small photo will do).
small = lambda n: max(16, round(n * scale) // 16 * 16)
prompt = "一只小狗坐在草地上，阳光明媚。"
edit_image = pipe(prompt, seed=0, num_inference_steps=num_inference_steps, height=small(384), width=small(512))
edit_image.save("image_lowres.jpg")

prompt = "高清，细节丰富，清晰锐利。"
image = pipe(
    prompt, edit_image=edit_image, seed=1, num_inference_steps=num_inference_steps,
    height=small(768), width=small(1024), edit_rope_interpolation=True, edit_image_auto_resize=False,
)
image.save("image_highres.jpg")
