# DiffSynth-Studio's Qwen-Image-Blockwise-ControlNet-Depth example, on qistudio, low-VRAM: only the import differs (and the
# control map is made here instead of downloaded).
# Models rest in host memory (DiT and text encoder in FP8) and visit the GPU for their phase.
#
# Unset, the environment changes nothing. For a quick run (the tests run this file with a tiny model):
#   QISTUDIO_MODEL_BASE_PATH=DIR QISTUDIO_SKIP_DOWNLOAD=1  read DIR/<repo>/... instead of downloading
#   QISTUDIO_EXAMPLE_DEVICE=cpu  QISTUDIO_EXAMPLE_STEPS=2  QISTUDIO_EXAMPLE_SIZE=64
import os

from qistudio import QwenImagePipeline, ModelConfig, ControlNetInput
import torch

device = os.environ.get("QISTUDIO_EXAMPLE_DEVICE", "cuda")
num_inference_steps = int(os.environ.get("QISTUDIO_EXAMPLE_STEPS", "30"))
size = int(os.environ.get("QISTUDIO_EXAMPLE_SIZE", "1328"))

pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device=device,
    model_configs=[
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="text_encoder/model*.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="vae/diffusion_pytorch_model.safetensors", offload_device="cpu"),
        ModelConfig(model_id="DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Depth", origin_file_pattern="model.safetensors"),
    ],
    tokenizer_config=ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="tokenizer/"),
)
pipe.enable_vram_management()
# A picture to take the structure from: generated here (any photo will do).
source = pipe("一只坐在石阶上的柴犬，午后阳光", seed=0, num_inference_steps=num_inference_steps, height=size, width=size)
source.save("image_source.jpg")

# A depth map from your depth estimator (white = near). Here a stand-in: brightness, as no annotator downloads
# weights at run time in qistudio.
control_image = source.convert("L").convert("RGB")
control_image.save("image_control.jpg")
image = pipe(
    "一只坐在石阶上的白色小猫，午后阳光", seed=1, num_inference_steps=num_inference_steps, height=size, width=size,
    blockwise_controlnet_inputs=[ControlNetInput(image=control_image)],
)
image.save("image.jpg")
