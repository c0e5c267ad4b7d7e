# DiffSynth-Studio's Qwen-Image-In-Context-Control-Union example, on qistudio: only the import differs (and the
# control map is made here instead of downloaded). A LoRA that reads a control map (canny, depth, lineart, softedge,
# normal, openpose) given as context_image; the prompt's trigger "Context_Control. " is added when missing.
#
# Unset, the environment changes nothing. For a quick run (the tests run this file with a tiny model):
#   QISTUDIO_MODEL_BASE_PATH=DIR QISTUDIO_SKIP_DOWNLOAD=1  read DIR/<repo>/... instead of downloading
#   QISTUDIO_EXAMPLE_DEVICE=cpu  QISTUDIO_EXAMPLE_STEPS=2  QISTUDIO_EXAMPLE_SIZE=64
import os

from qistudio import QwenImagePipeline, ModelConfig
from qistudio.annotators import canny
import torch

device = os.environ.get("QISTUDIO_EXAMPLE_DEVICE", "cuda")
num_inference_steps = int(os.environ.get("QISTUDIO_EXAMPLE_STEPS", "30"))
size = int(os.environ.get("QISTUDIO_EXAMPLE_SIZE", "1024"))

pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device=device,
    model_configs=[
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors"),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="text_encoder/model*.safetensors"),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="vae/diffusion_pytorch_model.safetensors"),
    ],
    tokenizer_config=ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="tokenizer/"),
)
pipe.load_lora(pipe.dit, ModelConfig(model_id="DiffSynth-Studio/Qwen-Image-In-Context-Control-Union", origin_file_pattern="model.safetensors"))
source = pipe("一座海边的白色灯塔，晴天", seed=0, num_inference_steps=num_inference_steps, height=size, width=size)
control_image = canny(source)
control_image.save("image_control.jpg")
image = pipe(
    "Context_Control. 一座雪山脚下的红色灯塔，黄昏", seed=1, num_inference_steps=num_inference_steps,
    height=size, width=size, context_image=control_image,
)
image.save("image.jpg")
