"""Which Qwen-Image 2.1 model a checkpoint holds, from its tensor names: its DiT, its VAE, or its Qwen3-VL encoder.

Called first by formats.detect_layout. Each 2.1 model is told from the 20B family by names only it has: the DiT
by its shared `modulation` and SwiGLU `img_mlp.gate_layer` (the 20B DiT has per-block `img_mod`), the VAE by its
residual levels `down_blocks.N.resnets.M` (the 20B VAE's down blocks are one flat list), the text encoder by
Qwen3-VL's DeepStack mergers and per-head q/k norms (Qwen2.5-VL has neither). Main layouts load by identity;
DiT prefixes (ComfyUI single files) are stripped as for the 20B DiT.
"""

from __future__ import annotations

from .formats import _DIT_PREFIXES, DIT, IGNORED, TEXT_ENCODER, VAE, Layout, _dit_key, _strip

QWEN21_DIT_LAYOUT = "Qwen-Image-2.1 DiT"
QWEN21_VAE_LAYOUT = "Qwen-Image-2.1 VAE (diffusers)"
QWEN3_VL_LAYOUT = "Qwen3-VL (Qwen-Image-2.1 text encoder)"


def is_qwen21_dit(keys) -> bool:
    return "modulation.1.weight" in keys and any(".img_mlp.gate_layer." in k for k in keys)


def is_qwen21_vae(keys) -> bool:
    return "encoder.down_blocks.0.resnets.0.conv1.weight" in keys and "decoder.conv_in.weight" in keys


def is_qwen3_vl(keys) -> bool:
    return any(".deepstack_merger_list." in k or ".self_attn.q_norm." in k for k in keys)


def detect_qwen21_layout(keys: set[str]) -> Layout | None:
    """The Qwen-Image 2.1 layout of a checkpoint's tensor names, or None for any other model."""
    stripped = {_strip(_DIT_PREFIXES, k) for k in keys}
    if is_qwen21_dit(stripped):
        prefixed = next((p for p in _DIT_PREFIXES if any(k.startswith(p) for k in keys)), None)
        return Layout(DIT, f"{QWEN21_DIT_LAYOUT} ({'prefix ' + repr(prefixed) if prefixed else 'diffusers'})",
                      _dit_key)
    if is_qwen21_vae(keys):
        return Layout(VAE, QWEN21_VAE_LAYOUT, lambda k: k)
    if any(k.endswith("embed_tokens.weight") for k in keys) and is_qwen3_vl(keys):
        return Layout(TEXT_ENCODER, QWEN3_VL_LAYOUT, lambda k: IGNORED if k.startswith("lm_head.") else k)
    return None
