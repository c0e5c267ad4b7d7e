"""LoRA for the Qwen-Image models: load any format, stack, scale, fuse exactly, unload, convert.

    name = load_lora(pipe.dit, "style.safetensors", alpha=0.8, text_encoder=pipe.text_encoder)
    set_lora_scale(pipe.dit, name, 0.5)
    unload_lora(pipe.dit)  # all of them
    convert_lora_file("trained.safetensors", "for_comfyui.safetensors", to="comfyui")

engine.py holds the design note (hooks beside the weights, exact unfuse); keys.py and names.py the formats read.
"""

from .engine import (LoRAInfo, fuse_lora, list_loras, load_lora, lora_tensors, set_lora_scale, unfuse_lora,
                     unload_lora)
from .errors import LoRAError
from .export import FORMATS, convert_lora_file, convert_lora_state_dict

__all__ = [
    "FORMATS", "LoRAError", "LoRAInfo", "convert_lora_file", "convert_lora_state_dict", "fuse_lora", "list_loras",
    "load_lora", "lora_tensors", "set_lora_scale", "unfuse_lora", "unload_lora",
]
