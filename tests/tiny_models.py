"""Tiny reference models (diffusers, transformers) with random weights, saved in the real on-disk layouts."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_DIM = 64  # tiny text encoder width = the DiT's joint_attention_dim
AXES = (8, 12, 12)  # RoPE split for head_dim 32


def _perturb(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere, so zero-inits (gates, norms at 1) do not hide mistakes."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def reference_dit(num_layers: int = 2, zero_cond_t: bool = False):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=AXES, zero_cond_t=zero_cond_t,
    )
    return _perturb(model)


def reference_vae():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    return _perturb(AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                           attn_scales=[], temperal_downsample=[False, True, True]), 0.02)


def reference_text_encoder(vocab_size: int = 151936):
    """transformers' Qwen2.5-VL at the demo model's tiny size (one config for both), with random weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qistudio.demo import demo_text_encoder_config

    torch.manual_seed(0)
    config = demo_text_encoder_config()
    config.text_config.vocab_size = vocab_size
    config._attn_implementation = "sdpa"
    return _perturb(Qwen2_5_VLForConditionalGeneration(config), 0.02)


def save(model, folder: Path, **kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


QWEN_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
    shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
)


def write_tiny_qwen_image(folder: Path) -> Path:
    """A tiny random Qwen-Image repository in the real layout, written by the reference classes."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qistudio.tokenizer_build import write_qwen25_processor, write_qwen25_tokenizer

    save(reference_dit(), folder / "transformer", max_shard_size="300KB")
    save(reference_text_encoder(), folder / "text_encoder")
    vae = reference_vae()
    save(vae, folder / "vae")
    write_qwen25_tokenizer(folder / "tokenizer")
    write_qwen25_processor(folder / "processor")  # as Qwen/Qwen-Image-Edit ships it
    FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER).save_pretrained(folder / "scheduler")
    return folder


_READ_ONLY_PARTS: dict[tuple[str, str], object] = {}


def read_only_part(folder: Path, name: str, load):
    """`load(folder / name)`, loaded once per test session: the reference pipelines' tokenizers, processors and text
    encoders, which the pipelines and tests only read (parsing the 11 MB tokenizer.json alone takes ~0.8 s). Each
    pipeline still gets its own scheduler, VAE and transformer, the parts tests hook, step or change."""
    key = (str(Path(folder).resolve()), name)
    if key not in _READ_ONLY_PARTS:
        _READ_ONLY_PARTS[key] = load(Path(folder) / name)
    return _READ_ONLY_PARTS[key]


def reference_pipeline(folder: Path, kind: str = "text", transformer=None):
    """diffusers' pipeline over the tiny repository's components.

    kind: "text" (QwenImagePipeline), "img2img", "edit" (QwenImageEditPipeline) or "edit_plus" (Edit-2509/2511).
    """
    import diffusers
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    cls = {"text": diffusers.QwenImagePipeline, "img2img": diffusers.QwenImageImg2ImgPipeline,
           "edit": diffusers.QwenImageEditPipeline, "edit_plus": diffusers.QwenImageEditPlusPipeline}[kind]
    extra = ({"processor": read_only_part(folder, "processor", AutoProcessor.from_pretrained)}
             if kind.startswith("edit") else {})
    return cls(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=diffusers.AutoencoderKLQwenImage.from_pretrained(folder / "vae").eval(),
        text_encoder=read_only_part(folder, "text_encoder",
                                    lambda path: Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()),
        tokenizer=read_only_part(folder, "tokenizer", AutoTokenizer.from_pretrained),
        transformer=transformer or diffusers.QwenImageTransformer2DModel.from_pretrained(folder / "transformer").eval(),
        **extra,
    )
