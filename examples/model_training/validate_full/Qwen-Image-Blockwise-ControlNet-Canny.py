# DiffSynth-Studio's validate_full/Qwen-Image-Blockwise-ControlNet-Canny.py, on qistudio:
# The trained Canny ControlNet, loaded from its file like the released one.
#
# The images come from the seed's example dataset:
#   modelscope download --dataset DiffSynth-Studio/example_image_dataset --local_dir ./data/example_image_dataset
#
# Unset, the environment changes nothing. For a quick run (the tests run this file after a one-step training):
#   QISTUDIO_MODEL_BASE_PATH=DIR QISTUDIO_SKIP_DOWNLOAD=1  QISTUDIO_EXAMPLE_DEVICE=cpu
#   QISTUDIO_EXAMPLE_STEPS=2  QISTUDIO_EXAMPLE_SIZE=64  QISTUDIO_EXAMPLE_CHECKPOINT=path/to/step-1.safetensors
import os

from PIL import Image
from qistudio import QwenImagePipeline, ModelConfig, ControlNetInput
import torch

device = os.environ.get("QISTUDIO_EXAMPLE_DEVICE", "cuda")
num_inference_steps = int(os.environ.get("QISTUDIO_EXAMPLE_STEPS", "30"))
size = int(os.environ.get("QISTUDIO_EXAMPLE_SIZE", "1328"))
checkpoint = os.environ.get(
    "QISTUDIO_EXAMPLE_CHECKPOINT", "models/train/Qwen-Image-Blockwise-ControlNet-Canny_full/epoch-1.safetensors"
)

pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device=device,
    model_configs=[
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors"),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="text_encoder/model*.safetensors"),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="vae/diffusion_pytorch_model.safetensors"),
        ModelConfig(path=checkpoint),
    ],
    tokenizer_config=ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="tokenizer/"),
)

controlnet_image = Image.open("data/example_image_dataset/canny/image_1.jpg").resize((size, size))
image = pipe(
    "一只小狗，毛发光洁柔顺，眼神灵动，背景是樱花纷飞的春日庭院，唯美温馨。", seed=0, num_inference_steps=num_inference_steps, height=size, width=size,
    blockwise_controlnet_inputs=[ControlNetInput(image=controlnet_image)],
)
image.save("image.jpg")
