"""The empty (meta-device) Qwen-Image 2.1 model that a checkpoint's shapes and config.json describe.

Called first by build.build_empty; None for any model that is not Qwen-Image 2.1's, which build_empty then builds.
"""

from __future__ import annotations

import torch.nn as nn

from ..models.dit21 import QwenImage21DiT, dit21_config_from_shapes
from ..models.text_encoder21 import QwenImage21TextEncoder, text_encoder21_config_from_shapes
from ..models.vae21 import QwenImage21VAE, VAE21Config
from .formats import DIT, TEXT_ENCODER, VAE
from .formats21 import is_qwen21_dit, is_qwen21_vae, is_qwen3_vl


def build_qwen21(kind: str, shapes: dict[str, tuple[int, ...]], config_json: dict | None) -> nn.Module | None:
    """Call inside build.empty_parameters(). `shapes` are in our names."""
    if kind == DIT and is_qwen21_dit(shapes):
        return QwenImage21DiT(dit21_config_from_shapes(shapes, config_json))
    if kind == VAE and is_qwen21_vae(shapes):
        if config_json and "latents_mean" in config_json:
            return QwenImage21VAE(VAE21Config.from_diffusers_config(config_json))
        return QwenImage21VAE(VAE21Config.from_shapes(shapes))
    if kind == TEXT_ENCODER and is_qwen3_vl(shapes):
        if config_json and "vision_config" in config_json:
            from transformers import Qwen3VLConfig

            try:
                config = Qwen3VLConfig.from_dict(config_json)
            except Exception as e:  # noqa: BLE001 - transformers' field validators raise their own types
                raise ValueError(f"{type(e).__name__}: {' '.join(str(e).split())}") from None
            return QwenImage21TextEncoder(config)
        return QwenImage21TextEncoder(text_encoder21_config_from_shapes(shapes))
    return None
