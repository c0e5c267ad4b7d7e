# Qwen-Image-2512 in 4 steps with lightx2v's Lightning LoRA (lightx2v/Qwen-Image-2512-Lightning, released
# 2026-01-01). The settings are the published ones (qistudio.presets, which cites them): the "Qwen-Image-Lightning"
# schedule (fixed shift ln 3, no terminal stretch), 4 steps, cfg_scale=1 (no guidance).
#
# Unset, the environment changes nothing. For a quick run (the tests run this file with a tiny model):
#   QISTUDIO_MODEL_BASE_PATH=DIR QISTUDIO_SKIP_DOWNLOAD=1  read DIR/<repo>/... instead of downloading
#   QISTUDIO_EXAMPLE_DEVICE=cpu  QISTUDIO_EXAMPLE_SIZE=64
import os

from qistudio import QwenImagePipeline, FlowMatchScheduler
from qistudio.presets import LORA_PRESETS, MODEL_PRESETS
import torch

device = os.environ.get("QISTUDIO_EXAMPLE_DEVICE", "cuda")
size = int(os.environ.get("QISTUDIO_EXAMPLE_SIZE", "1328"))

base = MODEL_PRESETS["Qwen/Qwen-Image-2512"]
lightning = LORA_PRESETS["Qwen-Image-2512-Lightning-4steps"]
pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device=device,
    model_configs=base.model_configs(),
    tokenizer_config=base.tokenizer_config(),
)
pipe.load_lora(pipe.dit, lightning.lora_config())
pipe.scheduler = FlowMatchScheduler(lightning.scheduler)
prompt = "精致肖像，水下少女，蓝裙飘逸，发丝轻扬，光影透澈，气泡环绕，面容恬静，细节精致，梦幻唯美。"
image = pipe(prompt, seed=0, num_inference_steps=lightning.steps, cfg_scale=lightning.cfg_scale, height=size,
             width=size)
image.save("image.jpg")
