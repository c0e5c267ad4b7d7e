"""LoRA files rewritten for another tool: diffusers, ComfyUI or DiffSynth-Studio names, written atomically.

Any layout we read comes in (keys.py, names.py); out goes one of:

  diffusers  `transformer.<module>.lora_A.weight` / `.lora_B.weight`, alpha / rank folded into lora_B and no
             `.alpha` key. That is what `QwenImagePipeline.load_lora_weights` loads as is: with an `.alpha` key
             diffusers converts the file and would prefix `transformer.` a second time.
  comfyui    `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` with `.alpha` kept; LoHa (`hada_*`),
             LoKr (`lokr_*`) and `.diff` / `.diff_b` deltas kept as they are. ComfyUI reads all of these, and
             diffusers reads the LoRA pairs of this layout too.
  diffsynth  `<module>.lora_A.default.weight` / `.lora_B.default.weight`, alpha folded (DiffSynth-Studio 1.x
             ignores `.alpha`), the layout its trainer writes.

Text-encoder layers keep the released checkpoint's names (`model.layers.N...`) under `text_encoder.` (diffusers;
its Qwen-Image pipeline does not load them, other tools and ours do) or `text_encoders.qwen25_7b.transformer.`
(ComfyUI). DiffSynth-Studio loads one model per file, so they are left out of a diffsynth file, with a warning.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig

from ..models.dit import DiTConfig, QwenImageDiT
from ..models.dit21 import DiT21Config, QwenImage21DiT
from ..models.text_encoder import QwenImageTextEncoder
from .errors import LoRAError
from .files import read_lora, write_safetensors
from .names import DIT, TEXT_ENCODER, Target, legacy_text_encoder_name, make_target
from .plan import PlacedLayer, place
from .updates import Dense, LoHa, LoKr, LowRank, Update

FORMATS = ("diffusers", "comfyui", "diffsynth")
_DIT_PREFIX = {"diffusers": "transformer.", "comfyui": "diffusion_model.", "diffsynth": ""}
_TEXT_ENCODER_PREFIX = {"diffusers": "text_encoder.", "comfyui": "text_encoders.qwen25_7b.transformer."}


def _depth(keys, pattern: str, default: int) -> int:
    found = [int(m.group(1)) for k in keys for m in [re.search(pattern, k)] if m]
    return max(found + [default - 1]) + 1


# Layers only Qwen-Image 2.1's DiT has (its SwiGLU MLP, its shared modulation, its text projection); the 20B DiT's MLP
# is `img_mlp.net.0.proj` / `img_mlp.net.2`. A file naming one is a 2.1 LoRA, whose other layers (attention) carry
# the same names in both models.
_QWEN21_ONLY = re.compile(r"img_mlp[._](?:proj|gate_layer|out)[._]|(?<![a-z])modulation[._]1[._]"
                          r"|txt_in[._](?:in|out)_layer")


@functools.lru_cache(maxsize=4)
def _reference_modules(blocks: int, layers: int, vision_blocks: int, qwen21: bool = False) -> tuple:
    # Module names do not depend on widths, so tiny widths on the meta device give the real names for free.
    with torch.device("meta"):
        sizes = dict(num_layers=blocks, num_heads=1, head_dim=8, text_dim=8, axes_dim=(2, 2, 4))
        dit = QwenImage21DiT(DiT21Config(**sizes)) if qwen21 else QwenImageDiT(DiTConfig(**sizes))
        config = Qwen2_5_VLConfig(
            text_config=dict(vocab_size=151936, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=8,
                             rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
            vision_config=dict(depth=vision_blocks, hidden_size=16, num_heads=2, intermediate_size=8,
                               out_hidden_size=16, fullatt_block_indexes=[]),
        )
        text_encoder = QwenImageTextEncoder(config)
    return dit, text_encoder


def reference_targets(keys) -> list[Target]:
    """A Qwen-Image DiT (2.1's where a key names a layer only it has) and text encoder as deep as `keys` need (at
    least the real 60 or 32 blocks, 28 + 32 layers)."""
    keys = list(keys)
    qwen21 = any(_QWEN21_ONLY.search(key) for key in keys)
    dit, text_encoder = _reference_modules(
        _depth(keys, r"transformer_blocks[._](\d+)[._]", 32 if qwen21 else 60),
        _depth(keys, r"layers[._](\d+)[._]", 28),
        _depth(keys, r"(?<!transformer_)blocks[._](\d+)[._]", 32),
        qwen21,
    )
    return [make_target(dit, DIT, "DiT"), make_target(text_encoder, TEXT_ENCODER, "text encoder")]


def _low_rank(update: LowRank, base: str, to: str) -> dict[str, torch.Tensor]:
    if to == "comfyui":
        out = {f"{base}.lora_A.weight": update.down, f"{base}.lora_B.weight": update.up}
        if update.alpha is not None:
            out[f"{base}.alpha"] = torch.tensor(update.alpha, dtype=torch.float32)
        return out
    # Fold alpha / rank into lora_B (in float32, back to the file's dtype): no reader can then miss it.
    up = update.up if update.scale == 1.0 else (update.up.float() * update.scale).to(update.up.dtype)
    infix = ".default" if to == "diffsynth" else ""
    return {f"{base}.lora_A{infix}.weight": update.down, f"{base}.lora_B{infix}.weight": up}


def _emit(update: Update, base: str, to: str, keys: list[str]) -> dict[str, torch.Tensor]:
    if isinstance(update, LowRank):
        return _low_rank(update, base, to)
    if to != "comfyui":
        raise LoRAError(f"{keys[0]}: a {update.kind} layer cannot be written for {to}, which loads LoRA pairs "
                        "(lora_A/lora_B) only; convert to comfyui, which keeps it")
    prefix = {LoHa: "hada_", LoKr: "lokr_", Dense: ""}[type(update)]
    out = {f"{base}.{prefix}{part}": tensor for part, tensor in update.tensors.items()}
    if update.alpha is not None:
        out[f"{base}.alpha"] = torch.tensor(update.alpha, dtype=torch.float32)
    return out


def _layer_base(layer: PlacedLayer, to: str) -> str | None:
    if layer.target.kind == TEXT_ENCODER:
        if to == "diffsynth":
            return None
        return _TEXT_ENCODER_PREFIX[to] + legacy_text_encoder_name(layer.module_name)
    return _DIT_PREFIX[to] + layer.module_name


def convert_lora_state_dict(
    state_dict: dict[str, torch.Tensor], to: str, *, peft_config: dict | None = None
) -> dict[str, torch.Tensor]:
    """A Qwen-Image LoRA state dict in any layout we read, rewritten in the `to` layout (see the module note)."""
    if to not in FORMATS:
        raise ValueError(f"unknown LoRA format to={to!r}; use one of {', '.join(FORMATS)}")
    placement = place(state_dict, reference_targets(state_dict.keys()), peft_config)
    if not placement.layers:
        shown = ", ".join(placement.unplaced[:20])
        raise LoRAError(f"none of the {len(state_dict)} tensors is a LoRA layer of Qwen-Image's DiT or text encoder "
                        f"(first names: {shown})")
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for layer in placement.layers:
        base = _layer_base(layer, to)
        if base is None:
            dropped += layer.keys
            continue
        for update in layer.updates:
            out.update(_emit(update, base, to, layer.keys))
    if dropped:
        warnings.warn(f"{len(dropped)} text-encoder tensors are left out: a {to} file holds the DiT only "
                      f"(first: {dropped[0]})", stacklevel=2)
    if placement.unplaced:
        warnings.warn(f"{len(placement.unplaced)} tensors are no LoRA layer of Qwen-Image and are left out "
                      f"(first: {', '.join(placement.unplaced[:5])})", stacklevel=2)
    return out


def convert_lora_file(src, dst: str | os.PathLike, to: str) -> Path:
    """Read a LoRA (path, shards, folder, ModelConfig or state dict), write it to `dst` in the `to` layout."""
    if to not in FORMATS:
        raise ValueError(f"unknown LoRA format to={to!r}; use one of {', '.join(FORMATS)}")
    lora_file = read_lora(src)
    converted = convert_lora_state_dict(lora_file.tensors, to, peft_config=lora_file.peft_config)
    return write_safetensors(converted, dst, metadata={"format": "pt", "qistudio_lora_format": to})
