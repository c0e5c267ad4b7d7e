"""LoRA state dicts written in each tool's layout, the tiny DiT to apply them to, and merging by hand."""

from __future__ import annotations

import torch
import torch.nn as nn

from qistudio.models.dit import DiTConfig, QwenImageDiT
from qistudio.ops.packing import patchify
from qistudio.ops.rope import ImageGrid, qwen_rotary
from qistudio.weights.build import empty_parameters
from tiny_models import AXES, TEXT_DIM

RANK, ALPHA = 4, 8.0
# A spread of the DiT's linears: both streams, attention, MLPs, modulation, and the top-level layers.
TARGETS = (
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_out.0",
    "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.img_mlp.net.0.proj",
    "transformer_blocks.0.txt_mlp.net.2", "transformer_blocks.1.img_mod.1", "transformer_blocks.1.txt_mod.1",
    "transformer_blocks.1.attn.to_v", "img_in", "txt_in", "proj_out", "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1",
)


def our_dit(reference: nn.Module, dtype=torch.float32) -> QwenImageDiT:
    """Our DiT holding its own copy of the reference's weights (so fusing never touches the reference)."""
    with empty_parameters():
        dit = QwenImageDiT(DiTConfig(num_layers=2, num_heads=2, head_dim=32, text_dim=TEXT_DIM, axes_dim=AXES))
    dit.load_state_dict({k: v.clone() for k, v in reference.state_dict().items()}, assign=True)
    return dit.to(dtype).eval()


class Inputs:
    """One fixed DiT call: 2 samples, a 4x6 patch grid, 5 text tokens."""

    def __init__(self, seed: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.h, self.w, self.text_len = 4, 6, 5
        self.tokens = patchify(torch.randn(2, 16, 2 * self.h, 2 * self.w, generator=g))
        self.text = torch.randn(2, self.text_len, TEXT_DIM, generator=g)
        self.sigma = torch.tensor([0.8, 0.35])

    def ours(self, dit: QwenImageDiT, dtype=torch.float32) -> torch.Tensor:
        rotary = qwen_rotary([ImageGrid(0, self.h, self.w)], self.text_len, axes_dim=AXES)
        with torch.no_grad():
            return dit(self.tokens.to(dtype), self.text.to(dtype), self.sigma, rotary).float()

    def diffusers(self, transformer) -> torch.Tensor:
        with torch.no_grad():
            return transformer(hidden_states=self.tokens, encoder_hidden_states=self.text, timestep=self.sigma,
                               img_shapes=[[(1, self.h, self.w)]] * 2, return_dict=False)[0]


def random_pairs(model: nn.Module, targets=TARGETS, rank=RANK, seed=0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (down (rank, in), up (out, rank))}, random (B is not zero, unlike a fresh trainer's)."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name in targets:
        out_features, in_features = model.get_submodule(name).weight.shape
        down = torch.randn(rank, in_features, generator=g) * 0.1
        pairs[name] = (down, torch.randn(out_features, rank, generator=g) * 0.1)
    return pairs


def merged(model: nn.Module, pairs, factor: float) -> dict[str, torch.Tensor]:
    """The state dict with W + factor * B @ A merged by hand, in float64 then back to each weight's dtype."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, (down, up) in pairs.items():
        weight = state[f"{name}.weight"]
        state[f"{name}.weight"] = (weight.double() + factor * (up.double() @ down.double())).to(weight.dtype)
    return state


# --- layouts ------------------------------------------------------------------------------------------------------


def peft_layout(pairs, prefix="", adapter=None, alpha=ALPHA) -> dict[str, torch.Tensor]:
    """PEFT / diffusers / DiffSynth: <prefix><module>.lora_A[.<adapter>].weight, optional <module>.alpha."""
    infix = f".{adapter}" if adapter else ""
    state = {}
    for name, (down, up) in pairs.items():
        state[f"{prefix}{name}.lora_A{infix}.weight"] = down
        state[f"{prefix}{name}.lora_B{infix}.weight"] = up
        if alpha is not None:
            state[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    return state


def down_up_layout(pairs, prefix="", alpha=ALPHA) -> dict[str, torch.Tensor]:
    """ComfyUI / lightx2v style: <prefix><module>.lora_down.weight / .lora_up.weight / .alpha."""
    state = {}
    for name, (down, up) in pairs.items():
        state[f"{prefix}{name}.lora_down.weight"] = down
        state[f"{prefix}{name}.lora_up.weight"] = up
        state[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    return state


def kohya_layout(pairs, prefix="lora_unet_", alpha=ALPHA) -> dict[str, torch.Tensor]:
    """kohya / musubi-tuner: lora_unet_<module with dots as underscores>.lora_down.weight (+ .alpha, bf16 scalar)."""
    state = {}
    for name, (down, up) in pairs.items():
        flat = prefix + name.replace(".", "_")
        state[f"{flat}.lora_down.weight"] = down
        state[f"{flat}.lora_up.weight"] = up
        state[f"{flat}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
    return state
