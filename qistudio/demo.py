"""Write a tiny random Qwen-Image repository in the real on-disk layout, for `qistudio generate --demo` and tests.

Design note. The folder looks like `Qwen/Qwen-Image` on the hub, only tiny: `transformer/` (our DiT, diffusers
names, two shards with an index and a diffusers config.json), `text_encoder/` (transformers' Qwen2.5-VL under
the released checkpoint's transformers-4 names `model.*` / `visual.*`, two shards, config.json), `vae/`
(diffusers names and config.json with the latent statistics), `tokenizer/` (the real Qwen2.5 tokenizer, built
offline, so the text encoder keeps the real vocabulary of 151,936), `processor/` (that tokenizer with
Qwen2.5-VL's image processor settings, as Qwen/Qwen-Image-Edit ships it, so the demo edits too), `scheduler/`
and `model_index.json`. Weights
are the modules' own initialisation plus small seeded normal noise, so no gate or norm sits at an exact 0 or 1;
they are stored in bfloat16 like the released files. No diffusers import: the runtime does not depend on it.

It is built in a temporary folder beside the target and renamed into place; a marker file written last says
the folder is complete, so an existing complete demo is reused and a half-built one is never mistaken for one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .fileio import current_umask
from .models.dit import DiTConfig, QwenImageDiT
from .models.vae import QwenImageVAE, VAEConfig
from .tokenizer_build import write_qwen25_processor, write_qwen25_tokenizer

DEMO_VERSION = 2  # 2: processor/ (Qwen2.5-VL image processor) for edits
MARKER = ".qistudio-demo.json"
SEED = 0
TEXT_DIM = 64  # tiny text encoder width = the DiT's joint_attention_dim
DEMO_DIT = DiTConfig(num_layers=2, num_heads=2, head_dim=32, text_dim=TEXT_DIM, axes_dim=(8, 12, 12))
DEMO_VAE = VAEConfig(base_dim=16, z_dim=16, num_res_blocks=1)
SCHEDULER = dict(
    _class_name="FlowMatchEulerDiscreteScheduler", base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
    max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
    use_dynamic_shifting=True,
)  # fmt: skip


def default_demo_dir() -> Path:
    """Where `--demo` keeps its model: $XDG_CACHE_HOME/qistudio/demo, else ~/.cache/qistudio/demo."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "qistudio" / "demo"


def is_complete_demo(folder: str | os.PathLike) -> bool:
    marker = Path(folder) / MARKER
    try:
        return json.loads(marker.read_text()).get("version") == DEMO_VERSION
    except (OSError, ValueError):
        return False


def _perturbed(model: torch.nn.Module, scale: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The model's state with seeded N(0, scale) noise added, in bfloat16, contiguous."""
    state = {}
    for name, tensor in model.state_dict().items():
        noisy = tensor.float() + torch.randn(tensor.shape, generator=generator) * scale
        state[name] = noisy.to(torch.bfloat16).contiguous()
    return state


def _save_shards(state: dict[str, torch.Tensor], folder: Path, stem: str, num_shards: int) -> None:
    """`stem.safetensors`, or `stem-0000i-of-0000n.safetensors` plus `stem.safetensors.index.json` as the hub has."""
    folder.mkdir(parents=True, exist_ok=True)
    if num_shards == 1:
        save_file(state, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(state)
    size = -(-len(keys) // num_shards)
    weight_map = {}
    for index in range(num_shards):
        name = f"{stem}-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {key: state[key] for key in keys[index * size : (index + 1) * size]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(folder / f"{stem}.safetensors.index.json", index)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_transformer(folder: Path, generator: torch.Generator) -> None:
    cfg = DEMO_DIT
    _save_shards(_perturbed(QwenImageDiT(cfg), 0.05, generator), folder, "diffusion_pytorch_model", 2)
    _write_json(folder / "config.json", {
        "_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels // 4, "num_layers": cfg.num_layers, "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads, "joint_attention_dim": cfg.text_dim, "guidance_embeds": False,
        "axes_dims_rope": list(cfg.axes_dim),
    })  # fmt: skip


def _write_vae(folder: Path, generator: torch.Generator) -> None:
    cfg = DEMO_VAE
    _save_shards(_perturbed(QwenImageVAE(cfg), 0.02, generator), folder, "diffusion_pytorch_model", 1)
    _write_json(folder / "config.json", {
        "_class_name": "AutoencoderKLQwenImage", "base_dim": cfg.base_dim, "z_dim": cfg.z_dim,
        "dim_mult": list(cfg.dim_mult), "num_res_blocks": cfg.num_res_blocks, "attn_scales": [],
        "temperal_downsample": list(cfg.temporal_downsample), "dropout": 0.0, "input_channels": cfg.image_channels,
        "latents_mean": list(cfg.latents_mean), "latents_std": list(cfg.latents_std),
    })  # fmt: skip


def demo_text_encoder_config():
    """A tiny Qwen2.5-VL with the real vocabulary (151,936) and token ids, so the real tokenizer fits."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=TEXT_DIM, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
            max_position_embeddings=4096, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=TEXT_DIM, patch_size=14,
            temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1],
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        architectures=["Qwen2_5_VLForConditionalGeneration"],
    )  # fmt: skip


def _legacy_name(key: str) -> str:
    # Qwen2_5_VLModel names `language_model.*` / `visual.*`; the released files (transformers 4) `model.*` / `visual.*`.
    return "model." + key[len("language_model."):] if key.startswith("language_model.") else key


def _write_text_encoder(folder: Path, generator: torch.Generator) -> None:
    from transformers import Qwen2_5_VLModel

    config = demo_text_encoder_config()
    state = _perturbed(Qwen2_5_VLModel(config), 0.02, generator)
    _save_shards({_legacy_name(k): v for k, v in state.items()}, folder, "model", 2)
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)


def _build(folder: Path) -> None:
    generator = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):  # module init draws from the global RNG: keep the caller's untouched
        torch.manual_seed(SEED)
        _write_transformer(folder / "transformer", generator)
        _write_vae(folder / "vae", generator)
        _write_text_encoder(folder / "text_encoder", generator)
    write_qwen25_tokenizer(folder / "tokenizer")
    write_qwen25_processor(folder / "processor")
    _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER)
    _write_json(folder / "model_index.json", {
        "_class_name": "QwenImagePipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKLQwenImage"],
    })  # fmt: skip
    _write_json(folder / MARKER, {"version": DEMO_VERSION, "seed": SEED})  # last: the folder is now complete


def _make_readable(folder: Path) -> None:
    # mkdtemp makes 0700 and some writers 0600; the demo is a cache like any model folder: use the umask's modes.
    umask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_demo_model(folder: str | os.PathLike | None = None) -> Path:
    """A tiny random Qwen-Image repository at `folder` (default `default_demo_dir()`); reused when complete.

    Load it like the hub repository, e.g. `ModelConfig(path=folder / "transformer")`, ... and
    `tokenizer_config=ModelConfig(path=folder / "tokenizer")`.
    """
    folder = Path(folder if folder is not None else default_demo_dir()).expanduser().absolute()
    return write_folder_once(folder, _build, is_complete_demo, MARKER)


def write_folder_once(folder: Path, build, is_complete, marker: str) -> Path:
    """`build(staging)` in a temporary folder beside `folder`, renamed into place; reused when `is_complete`."""
    if is_complete(folder):
        return folder
    if folder.exists() and any(folder.iterdir()) and not (folder / marker).exists():
        raise FileExistsError(f"{folder} exists and is not a qistudio demo model; give an empty or new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        build(staging)
        _make_readable(staging)
        if is_complete(folder):  # a concurrent build finished first
            return folder
        if folder.exists():  # empty, or a demo of another version: replace it
            shutil.rmtree(folder)
        try:
            os.rename(staging, folder)
        except OSError:
            if not is_complete(folder):  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
