"""qistudio: generate, edit and train the Qwen-Image family of diffusion models."""

from .pipeline import QwenImagePipeline
from .weights.model_config import ModelConfig

__all__ = ["QwenImagePipeline", "ModelConfig"]
__version__ = "0.1.0"
