# DiffSynth-Studio's validate_lora/Qwen-Image-EliGen.py, on qistudio:
# The trained EliGen LoRA, entity prompts placed by their masks.
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
num_inference_steps = int(os.environ.get("QISTUDIO_EXAMPLE_STEPS", "30"))
size = int(os.environ.get("QISTUDIO_EXAMPLE_SIZE", "1024"))
checkpoint = os.environ.get("QISTUDIO_EXAMPLE_CHECKPOINT", "models/train/Qwen-Image-EliGen_lora/epoch-4.safetensors")

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
pipe.load_lora(pipe.dit, checkpoint)

entity_prompts = ["A beautiful girl", "sign 'Entity Control'", "shorts", "shirt"]
global_prompt = "A beautiful girl wearing shirt and shorts in the street,  holding a sign 'Entity Control'"
masks = [Image.open(f"data/example_image_dataset/eligen/{i}.png").convert("RGB") for i in range(len(entity_prompts))]
image = pipe(
    global_prompt, seed=0, num_inference_steps=num_inference_steps, height=size, width=size,
    eligen_entity_prompts=entity_prompts, eligen_entity_masks=masks,
)
image.save("image.jpg")
