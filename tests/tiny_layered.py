"""A tiny random Qwen-Image-Layered repository in the real layout, written by diffusers' classes, and diffusers'
QwenImageLayeredPipeline over it (the reference)."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import AXES, TEXT_DIM, _perturb, save

# Qwen-Image-Layered's scheduler_config.json (as in diffusers/Qwen-Image-Layered-modular): linear time shift with
# the pipeline's mu, no terminal stretch.
LAYERED_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
    shift=1.0, shift_terminal=None, time_shift_type="linear", use_dynamic_shifting=True,
)


def layered_dit():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(1)
    return _perturb(QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=AXES, use_additional_t_cond=True, use_layer3d_rope=True,
    ))


def rgba_vae():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(2)
    return _perturb(AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                           attn_scales=[], temperal_downsample=[False, True, True],
                                           input_channels=4), 0.02)


def write_tiny_layered(folder: Path, base: Path) -> Path:
    """transformer/ and vae/ of Qwen-Image-Layered; text_encoder/, tokenizer/, processor/ from `base` (the tiny
    Qwen-Image repository: Layered uses the same Qwen2.5-VL), hard-linked: real folders, as a download makes."""
    import os
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler

    save(layered_dit(), folder / "transformer")
    save(rgba_vae(), folder / "vae")
    for name in ("text_encoder", "tokenizer", "processor"):
        shutil.copytree(base / name, folder / name, copy_function=os.link)
    FlowMatchEulerDiscreteScheduler(**LAYERED_SCHEDULER).save_pretrained(folder / "scheduler")
    return folder


def reference_layered(folder: Path):
    import diffusers
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    return diffusers.QwenImageLayeredPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=diffusers.AutoencoderKLQwenImage.from_pretrained(folder / "vae").eval(),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        processor=AutoProcessor.from_pretrained(folder / "processor"),
        transformer=diffusers.QwenImageTransformer2DModel.from_pretrained(folder / "transformer").eval(),
    )


def load_layered_pipe(folder: Path, dtype=torch.float32):
    from qistudio import ModelConfig, QwenImagePipeline

    return QwenImagePipeline.from_pretrained(
        torch_dtype=dtype, device="cpu",
        model_configs=[ModelConfig(path=str(folder / name)) for name in ("transformer", "text_encoder", "vae")],
        tokenizer_config=ModelConfig(path=str(folder / "tokenizer")),
        processor_config=ModelConfig(path=str(folder / "processor")),
    )
