"""qistudio: generate, edit and train the Qwen-Image family of diffusion models."""

from .conditioning.control import ControlNetInput
from .pipeline import QwenImagePipeline
from .sampling.schedule import FlowMatchScheduler
from .weights.model_config import ModelConfig

__all__ = ["QwenImagePipeline", "ModelConfig", "FlowMatchScheduler", "ControlNetInput"]
__version__ = "0.1.0"
