"""Which model a checkpoint holds, in which layout, and how its keys map onto our modules.

Recognition reads tensor names and shapes only (never a hash of the key list, so a resized or partial model is
still recognised and reported precisely). Each layout is a key map: checkpoint name -> our parameter name, or
IGNORED for tensors that are known and deliberately not loaded (the text encoder's unused lm_head, FP8 scale
tensors that are folded into their weight).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .errors import CheckpointError

IGNORED = "<ignored>"

DIT, VAE, TEXT_ENCODER, CONTROLNET = "dit", "vae", "text_encoder", "controlnet"
KINDS = (DIT, VAE, TEXT_ENCODER, CONTROLNET)
# Two ControlNet layouts, one kind: both go to `components.controlnets` and are selected by `controlnet_id`.
BLOCKWISE_CONTROLNET_LAYOUT = "Blockwise ControlNet"
INSTANTX_CONTROLNET_LAYOUT = "InstantX ControlNet (diffusers)"

# ComfyUI single files and some merges wrap the DiT in one of these.
_DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
# Per-tensor scales stored beside float8 weights (ComfyUI "scaled fp8", and the `weight_scale` convention).
_FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_FP8_IGNORED = re.compile(r"(^|\.)(scaled_fp8|scale_input|input_scale)$")


@dataclass(frozen=True)
class Layout:
    kind: str
    name: str  # human-readable layout name for messages
    key_map: Callable[[str], str]  # checkpoint key -> model key or IGNORED


def _strip(prefixes: tuple[str, ...], key: str) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def fp8_scale_key(weight_key: str, keys) -> str | None:
    """The per-tensor scale stored for a float8 weight, if the file has one."""
    base = weight_key.removesuffix(".weight")
    for suffix in _FP8_SCALE_SUFFIXES:
        if base + suffix in keys:
            return base + suffix
    return None


def _dit_key(key: str) -> str:
    if key.endswith(_FP8_SCALE_SUFFIXES) or _FP8_IGNORED.search(key):
        return IGNORED
    return _strip(_DIT_PREFIXES, key)


def _legacy_text_encoder_key(key: str) -> str:
    # transformers 4.x saved Qwen2.5-VL as visual.* / model.* / lm_head.*; we hold it as transformers 5 names it,
    # minus the lm_head: the pipeline reads hidden states only, so 1 GiB of vocabulary projection is not loaded.
    if key.startswith("lm_head."):
        return IGNORED
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + key[len("model."):]
    return key


def detect_layout(keys, where: str | None = None) -> Layout:
    """The layout of a checkpoint from its tensor names; a clear error (naming `where`, the files) when it holds no
    model we know."""
    keys = set(keys)
    from .formats21 import detect_qwen21_layout  # Qwen-Image 2.1's DiT, VAE and Qwen3-VL encoder

    if (qwen21 := detect_qwen21_layout(keys)) is not None:
        return qwen21
    # Before the DiT: InstantX's ControlNet holds DiT blocks (`transformer_blocks.N.img_mod.1`) and, like the
    # Blockwise one, `controlnet_blocks.N`; its control embedder is the name only it has.
    if "controlnet_x_embedder.weight" in keys:
        return Layout(CONTROLNET, INSTANTX_CONTROLNET_LAYOUT, lambda k: k)
    stripped = {_strip(_DIT_PREFIXES, k) for k in keys}
    if any(k.startswith("transformer_blocks.") and ".img_mod.1." in k for k in stripped):
        prefixed = next((p for p in _DIT_PREFIXES if any(k.startswith(p) for k in keys)), None)
        # Qwen-Image-Layered's DiT is the only one with the extra timestep row; say so in messages.
        layered = "time_text_embed.addition_t_embedding.weight" in stripped
        family = "Qwen-Image-Layered DiT" if layered else "Qwen-Image DiT"
        return Layout(DIT, f"{family} ({'prefix ' + repr(prefixed) if prefixed else 'diffusers'})", _dit_key)
    if any(k.startswith("controlnet_blocks.") for k in keys):
        return Layout(CONTROLNET, BLOCKWISE_CONTROLNET_LAYOUT, lambda k: k)
    if "encoder.conv_in.weight" in keys and "decoder.conv_in.weight" in keys:
        return Layout(VAE, "Qwen-Image VAE (diffusers)", lambda k: k)
    if any(k.endswith("embed_tokens.weight") for k in keys):
        legacy = any(k.startswith("visual.") for k in keys) or "model.embed_tokens.weight" in keys
        if legacy:
            return Layout(TEXT_ENCODER, "Qwen2.5-VL (transformers 4 names)", _legacy_text_encoder_key)
        return Layout(TEXT_ENCODER, "Qwen2.5-VL", lambda k: IGNORED if k.startswith("lm_head.") else k)
    from .gguf_text_encoder import llama_cpp_layout  # Qwen2.5-VL as llama.cpp writes it (token_embd, blk.N.*)

    if (llama_cpp := llama_cpp_layout(keys)) is not None:
        return llama_cpp
    sample = ", ".join(sorted(keys)[:8]) or "(none: the file holds no tensors)"
    prefix = f"{where}: " if where else ""
    raise CheckpointError(
        f"{prefix}the tensors match no known model (Qwen-Image DiT, VAE, Qwen2.5-VL text encoder, Blockwise or "
        f"InstantX ControlNet, Qwen-Image-2.1 DiT, VAE, Qwen3-VL text encoder); first names: {sample}"
    )
