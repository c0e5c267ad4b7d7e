"""Qwen3-VL as Qwen-Image 2.1's text encoder: transformers' model, returning the last layer's states before the
final norm.

The model is transformers' `Qwen3VLModel`, not rewritten; its parameters sit under `model.` as in the checkpoint
(`model.language_model.*`, `model.visual.*`), and the unused `lm_head` is not loaded. Qwen-Image 2.1 was trained on
the last decoder layer's output *before* the language model's final RMSNorm: both references read it by hooking
that norm (transformers 5 ties `hidden_states[-1]` to the normalised state), and so do we. The prompt template, the
system-turn drop and the vision slots are conditioning/qwen21.py's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import Qwen3VLConfig, Qwen3VLModel

# The released text encoder (Qwen3-VL-8B's shape), for checkpoints without a config.json: what shapes cannot say.
_RELEASED_TEXT = dict(head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=262144,
                      rope_parameters={"rope_type": "default", "rope_theta": 5_000_000, "mrope_interleaved": True,
                                       "mrope_section": [24, 20, 20]})
_RELEASED_DEEPSTACK = [8, 16, 24]


def text_encoder21_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> Qwen3VLConfig:
    """Qwen3-VL's size from (our) tensor names; RoPE settings and DeepStack layers are the released model's, so
    a resized model without its config.json is refused."""
    lm, vis = "model.language_model.", "model.visual."
    vocab, hidden = shapes[lm + "embed_tokens.weight"]
    head_dim = shapes[lm + "layers.0.self_attn.q_norm.weight"][0]
    vision_depth = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(vis + "blocks."))
    deepstack = 1 + max((int(k.split(".")[3]) for k in shapes if k.startswith(vis + "deepstack_merger_list.")),
                        default=-1)
    if head_dim != 128 or vision_depth != 27 or deepstack != len(_RELEASED_DEEPSTACK):
        raise ValueError(f"a Qwen3-VL text encoder of head size {head_dim}, {vision_depth} vision blocks and "
                         f"{deepstack} DeepStack mergers is not the released shape; its config.json must sit beside it")
    vision_hidden, _, temporal_patch, patch, _ = shapes[vis + "patch_embed.proj.weight"]
    merger_in = shapes[vis + "merger.linear_fc1.weight"][1]
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden,
            num_hidden_layers=1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(lm + "layers.")),
            num_attention_heads=shapes[lm + "layers.0.self_attn.q_proj.weight"][0] // head_dim,
            num_key_value_heads=shapes[lm + "layers.0.self_attn.k_proj.weight"][0] // head_dim,
            intermediate_size=shapes[lm + "layers.0.mlp.gate_proj.weight"][0], **_RELEASED_TEXT,
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, num_heads=vision_hidden // 72,
            intermediate_size=shapes[vis + "blocks.0.mlp.linear_fc1.weight"][0],
            out_hidden_size=shapes[vis + "merger.linear_fc2.weight"][0], patch_size=patch,
            temporal_patch_size=temporal_patch, spatial_merge_size=int(round((merger_in / vision_hidden) ** 0.5)),
            num_position_embeddings=shapes[vis + "pos_embed.weight"][0], deepstack_visual_indexes=_RELEASED_DEEPSTACK,
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False,
    )


class QwenImage21TextEncoder(nn.Module):
    """Qwen3-VL returning the last decoder layer's states, before the final norm: (B, S, hidden)."""

    def __init__(self, config: Qwen3VLConfig):
        super().__init__()
        config._attn_implementation = "sdpa"
        self.model = Qwen3VLModel(config)

    def forward(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None,
                mm_token_type_ids=None) -> torch.Tensor:
        captured = []
        norm = self.model.language_model.norm
        handle = norm.register_forward_hook(lambda module, args, output: captured.append(args[0]))
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                       image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, use_cache=False)
        finally:
            handle.remove()
        return captured[-1]
