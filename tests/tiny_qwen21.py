"""A tiny random Qwen-Image 2.1 repository in the real on-disk layout, written by the reference classes (diffusers'
QwenImage21Transformer2DModel and AutoencoderKLQwenImage21, transformers' Qwen3VLForConditionalGeneration), and
diffusers' QwenImage21Pipeline over it."""

from __future__ import annotations

from pathlib import Path

import torch

from qistudio.models.layout21 import ImageBlock, JointLayout
from tiny_models import QWEN_IMAGE_SCHEDULER, _perturb, read_only_part, save

TEXT_DIM = 64  # the tiny Qwen3-VL's hidden size = the DiT's context_in_dim
LATENT_CHANNELS = 16  # the tiny VAE's z_dim = the DiT's in_channels (64 in the released model)
# Tiny images: the processor must keep a 64x64 image at its size (one vision token per 32x32 pixels).
PROCESSOR_SIZE = {"shortest_edge": 1024, "longest_edge": 1 << 20}


def reference_dit21(num_layers: int = 2, causal_condition: bool = True):
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(0)
    model = QwenImage21Transformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=num_layers,
        attention_head_dim=32, num_attention_heads=2, context_in_dim=TEXT_DIM, mlp_ratio=3, axes_dims_rope=(8, 12, 12),
        causal_condition=causal_condition,
    )
    return _perturb(model)


def reference_vae21():
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(0)
    model = AutoencoderKLQwenImage21(
        base_dim=8, decoder_base_dim=12, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True, True],
        latents_mean=[0.05 * i - 0.4 for i in range(LATENT_CHANNELS)],
        latents_std=[1.0 + 0.05 * i for i in range(LATENT_CHANNELS)],
    )
    return _perturb(model, 0.02)


def tiny_qwen3_vl_config():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=TEXT_DIM, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000, "mrope_interleaved": True,
                             "mrope_section": [4, 2, 2]},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=TEXT_DIM, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False,
    )


def reference_text_encoder21():
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    config = tiny_qwen3_vl_config()
    config._attn_implementation = "sdpa"
    return _perturb(Qwen3VLForConditionalGeneration(config), 0.02)


def write_tiny_qwen_image21(folder: Path) -> Path:
    """transformer/, text_encoder/, vae/, processor/, scheduler/ as Qwen/Qwen-Image-2.1 lays them out."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qistudio.tokenizer_build21 import write_qwen3_vl_processor

    save(reference_dit21(), folder / "transformer", max_shard_size="200KB")
    save(reference_text_encoder21(), folder / "text_encoder")
    save(reference_vae21(), folder / "vae")
    write_qwen3_vl_processor(folder / "processor", size=PROCESSOR_SIZE)
    FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER).save_pretrained(folder / "scheduler")
    return folder


def reference_pipeline21(folder: Path):
    """diffusers 0.42.1's QwenImage21Pipeline over the tiny repository (float32, CPU)."""
    import diffusers
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    return diffusers.QwenImage21Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=diffusers.AutoencoderKLQwenImage21.from_pretrained(folder / "vae").eval(),
        text_encoder=read_only_part(folder, "text_encoder",
                                    lambda path: Qwen3VLForConditionalGeneration.from_pretrained(path).eval()),
        processor=read_only_part(folder, "processor", AutoProcessor.from_pretrained),
        transformer=diffusers.QwenImage21Transformer2DModel.from_pretrained(folder / "transformer").eval(),
    )


def model_configs21(folder: Path):
    """Our ModelConfigs for the tiny repository's three models, as the seed's examples list them."""
    from qistudio import ModelConfig

    return [
        ModelConfig(path=sorted(str(p) for p in (folder / "transformer").glob("*.safetensors"))),
        ModelConfig(path=str(folder / "text_encoder")),
        ModelConfig(path=str(folder / "vae" / "diffusion_pytorch_model.safetensors")),
    ]


# --- one DiT call in both forms ----------------------------------------------------------------------------------


def reference_inputs(layout: JointLayout, text_states, condition_tokens, target_tokens):
    """diffusers' arguments for one layout: the text encoder's sequence with (random, ignored) states in each
    image's vision slots, one slot per 2x2 latent tokens, the target's slots appended."""
    batch = target_tokens.shape[0]
    states, slots, text_at = [], [], 0
    for run in layout.prefix:
        if isinstance(run, ImageBlock):
            states.append(torch.randn(1, run.num_tokens // 4, TEXT_DIM))
            slots += [True] * (run.num_tokens // 4)
        else:
            states.append(text_states[:, text_at:text_at + run])
            slots += [False] * run
            text_at += run
    slots += [True] * (layout.target.num_tokens // 4)
    blocks = [*layout.condition_blocks, layout.target]
    image_tokens = target_tokens if condition_tokens is None else torch.cat(
        [condition_tokens.expand(batch, -1, -1), target_tokens], dim=1)
    return dict(
        hidden_states=image_tokens, encoder_hidden_states=torch.cat(states, dim=1).expand(batch, -1, -1),
        img_shapes=[[(1, b.height, b.width) for b in blocks]] * batch,
        img_mask=torch.tensor(slots)[None].expand(batch, -1), return_dict=False,
    )


def random_inputs(layout: JointLayout, batch: int = 2):
    g = torch.Generator().manual_seed(3)
    text = torch.randn(1, layout.num_text_tokens, TEXT_DIM, generator=g)
    num_condition = sum(b.num_tokens for b in layout.condition_blocks)
    condition = torch.randn(1, num_condition, LATENT_CHANNELS, generator=g) if num_condition else None
    target = torch.randn(batch, layout.target.num_tokens, LATENT_CHANNELS, generator=g)
    return text, condition, target


_REPOSITORY: list[Path] = []


def tiny_repository21(tmp_path_factory) -> Path:
    """The tiny repository, written once per test session (several test modules read it)."""
    if not _REPOSITORY:
        _REPOSITORY.append(write_tiny_qwen_image21(tmp_path_factory.mktemp("Qwen-Image-2.1")))
    return _REPOSITORY[0]
