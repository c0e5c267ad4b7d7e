"""The demo model's tiny relatives: a Blockwise ControlNet and a Qwen-Image-Layered DiT and VAE that fit it.

Design note. `--demo` serves the tiny random Qwen-Image (demo.py); the engine's Control and Layers paths need a
ControlNet and a Layered model of the same widths, so that `qistudio serve --demo` and `qistudio ui --demo` run
every feature offline. Each is written like the demo itself: random weights (the modules' initialisation plus
seeded noise, bfloat16), built in a temporary folder beside the target and renamed into place, a marker written
last so that a complete one is reused and a half-built one never mistaken for one. The Layered model has only
transformer/ and vae/: it reads prompts with the demo's own text encoder, tokenizer and processor (the same
Qwen2.5-VL, as the released Qwen-Image-Layered does), so its ModelConfigs point there.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from .demo import (DEMO_DIT, DEMO_VAE, _perturbed, _save_shards, _write_json, default_demo_dir,
                   write_folder_once)
from .models.controlnet import ControlNetConfig, QwenImageBlockwiseControlNet
from .models.dit import QwenImageDiT
from .models.vae import QwenImageVAE

FAMILY_VERSION = 1
MARKER = ".qistudio-demo-family.json"
CONTROLNET_FILE = "model.safetensors"
DEMO_CONTROLNET = ControlNetConfig(num_layers=DEMO_DIT.num_layers, dim=DEMO_DIT.dim)
DEMO_LAYERED_DIT = dataclasses.replace(DEMO_DIT, use_additional_t_cond=True, use_layer3d_rope=True)
DEMO_RGBA_VAE = dataclasses.replace(DEMO_VAE, image_channels=4)


def demo_controlnet_dir(demo: str | os.PathLike | None = None) -> Path:
    """Beside the demo model: <demo>-controlnet-canny."""
    demo = Path(demo if demo is not None else default_demo_dir()).expanduser().absolute()
    return demo.with_name(demo.name + "-controlnet-canny")


def demo_layered_dir(demo: str | os.PathLike | None = None) -> Path:
    """Beside the demo model: <demo>-layered."""
    demo = Path(demo if demo is not None else default_demo_dir()).expanduser().absolute()
    return demo.with_name(demo.name + "-layered")


def _complete(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("version") == FAMILY_VERSION
    except (OSError, ValueError):
        return False


def _write_once(folder: Path, build, seed: int) -> Path:
    """`build(staging, generator)` (seeded), its marker last, in a folder renamed into place; reused when complete."""

    def seeded(staging: Path) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # module init draws from the global RNG: keep the caller's untouched
            torch.manual_seed(seed)
            build(staging, generator)
        _write_json(staging / MARKER, {"version": FAMILY_VERSION, "seed": seed})

    return write_folder_once(folder, seeded, _complete, MARKER)


def _controlnet(folder: Path, generator: torch.Generator) -> None:
    net = QwenImageBlockwiseControlNet(DEMO_CONTROLNET)
    _save_shards(_perturbed(net, 0.05, generator), folder, CONTROLNET_FILE.removesuffix(".safetensors"), 1)


def _layered(folder: Path, generator: torch.Generator) -> None:
    cfg, vae = DEMO_LAYERED_DIT, DEMO_RGBA_VAE
    _save_shards(_perturbed(QwenImageDiT(cfg), 0.05, generator), folder / "transformer", "diffusion_pytorch_model", 1)
    _write_json(folder / "transformer" / "config.json", {
        "_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels // 4, "num_layers": cfg.num_layers, "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads, "joint_attention_dim": cfg.text_dim, "guidance_embeds": False,
        "axes_dims_rope": list(cfg.axes_dim), "use_additional_t_cond": True, "use_layer3d_rope": True,
    })  # fmt: skip
    _save_shards(_perturbed(QwenImageVAE(vae), 0.02, generator), folder / "vae", "diffusion_pytorch_model", 1)
    _write_json(folder / "vae" / "config.json", {
        "_class_name": "AutoencoderKLQwenImage", "base_dim": vae.base_dim, "z_dim": vae.z_dim,
        "dim_mult": list(vae.dim_mult), "num_res_blocks": vae.num_res_blocks, "attn_scales": [],
        "temperal_downsample": list(vae.temporal_downsample), "dropout": 0.0, "input_channels": vae.image_channels,
        "latents_mean": list(vae.latents_mean), "latents_std": list(vae.latents_std),
    })  # fmt: skip


def write_demo_controlnet(demo: str | os.PathLike | None = None) -> Path:
    """A tiny random Blockwise ControlNet (Canny's layout) for the demo DiT; returns its safetensors file."""
    return _write_once(demo_controlnet_dir(demo), _controlnet, seed=1) / CONTROLNET_FILE


def write_demo_layered(demo: str | os.PathLike | None = None) -> Path:
    """A tiny random Qwen-Image-Layered transformer/ and RGBA vae/ for the demo's text encoder; returns the folder."""
    return _write_once(demo_layered_dir(demo), _layered, seed=2)
