# DiffSynth-Studio's Qwen-Image-EliGen-V2 example, on qistudio, low-VRAM: only the import differs (and the masks are drawn
# here instead of downloaded). EliGen places each entity prompt in its own region (white in its mask). Models rest in host memory
# (DiT and text encoder in FP8) and visit the GPU for their phase.
#
# Unset, the environment changes nothing. For a quick run (the tests run this file with a tiny model):
#   QISTUDIO_MODEL_BASE_PATH=DIR QISTUDIO_SKIP_DOWNLOAD=1  read DIR/<repo>/... instead of downloading
#   QISTUDIO_EXAMPLE_DEVICE=cpu  QISTUDIO_EXAMPLE_STEPS=2  QISTUDIO_EXAMPLE_SIZE=64
import os

from qistudio import QwenImagePipeline, ModelConfig
from PIL import Image, ImageDraw
import torch

device = os.environ.get("QISTUDIO_EXAMPLE_DEVICE", "cuda")
num_inference_steps = int(os.environ.get("QISTUDIO_EXAMPLE_STEPS", "40"))
size = int(os.environ.get("QISTUDIO_EXAMPLE_SIZE", "1024"))

pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device=device,
    model_configs=[
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="text_encoder/model*.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="vae/diffusion_pytorch_model.safetensors", offload_device="cpu"),
    ],
    tokenizer_config=ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="tokenizer/"),
)
pipe.enable_vram_management()
pipe.load_lora(pipe.dit, ModelConfig(model_id="DiffSynth-Studio/Qwen-Image-EliGen-V2", origin_file_pattern="model.safetensors"))


def region(box):
    """A white box (fractions of the image: left, top, right, bottom) on black."""
    mask = Image.new("RGB", (size, size))
    ImageDraw.Draw(mask).rectangle([round(v * size) for v in box], fill=(255, 255, 255))
    return mask


global_prompt = "一张温馨的咖啡馆海报，木质桌面，窗外是下雨的街道"
entity_prompts = ["一杯冒着热气的拿铁咖啡", "一只趴在窗台上睡觉的橘猫", "写着“雨天特饮”的小黑板"]
entity_masks = [region((0.1, 0.55, 0.45, 0.95)), region((0.5, 0.1, 0.95, 0.45)), region((0.55, 0.55, 0.9, 0.95))]
image = pipe(
    global_prompt, seed=0, height=size, width=size, num_inference_steps=num_inference_steps, cfg_scale=4,
    eligen_entity_prompts=entity_prompts, eligen_entity_masks=entity_masks,
)
image.save("image.jpg")
