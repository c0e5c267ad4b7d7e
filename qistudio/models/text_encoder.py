"""Qwen2.5-VL as Qwen-Image's text encoder: transformers' model, the prompt templates, and the prefix drop.

The model itself is transformers' `Qwen2_5_VLModel`, not rewritten. Qwen-Image conditions on the last hidden
state of a chat template whose system turn describes the task; the system turn (and the user header) is dropped
from the states. How many tokens that is depends on the tokenizer, so it is computed, never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
_USER_HEADER = "<|im_start|>user\n"


def template_prefix(template: str) -> str:
    """The part of a template that is dropped from the states: the system turn and the user header."""
    return template[: template.index(_USER_HEADER) + len(_USER_HEADER)]


def template_prefix_length(tokenizer, template: str) -> int:
    return len(tokenizer(template_prefix(template), add_special_tokens=False)["input_ids"])


@dataclass
class TextStates:
    """Right-padded text states (B, L, D) and the valid length of each row."""

    states: torch.Tensor
    lengths: list[int]
    # EliGen: per row, the lengths of its packed text segments ([entity_1, ..., entity_N, global]); None = one each.
    segments: list[list[int]] | None = None

    def row_segments(self) -> list[list[int]]:
        return self.segments if self.segments is not None else [[n] for n in self.lengths]

    @property
    def mask(self) -> torch.Tensor:
        positions = torch.arange(self.states.shape[1], device=self.states.device)
        return positions[None, :] < torch.tensor(self.lengths, device=self.states.device)[:, None]


def text_encoder_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> Qwen2_5_VLConfig:
    """Infer Qwen2.5-VL's size from (our) tensor names; head sizes follow Qwen2.5-VL (128 text, 80 vision)."""
    lm, vis = "model.language_model.", "model.visual."
    vocab, hidden = shapes[lm + "embed_tokens.weight"]
    layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(lm + "layers."))
    head_dim = 128 if hidden % 128 == 0 else hidden // max(1, hidden // 64)
    kv_dim = shapes[lm + "layers.0.self_attn.k_proj.weight"][0]
    vision_hidden, _, temporal_patch, patch, _ = shapes[vis + "patch_embed.proj.weight"]
    vision_depth = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(vis + "blocks."))
    merger_in = shapes[vis + "merger.mlp.0.weight"][1]
    vision_head_dim = 80 if vision_hidden % 80 == 0 else 16
    mrope = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # (16, 24, 24) at head_dim 128
    full_attention = [i for i in (7, 15, 23, 31) if i < vision_depth] or [vision_depth - 1]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=hidden // head_dim, num_key_value_heads=kv_dim // head_dim,
            intermediate_size=shapes[lm + "layers.0.mlp.gate_proj.weight"][0], rms_norm_eps=1e-6,
            rope_theta=1_000_000.0, max_position_embeddings=128000,
            rope_scaling={"type": "mrope", "mrope_section": mrope},
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, num_heads=vision_hidden // vision_head_dim,
            intermediate_size=shapes[vis + "blocks.0.mlp.gate_proj.weight"][0],
            out_hidden_size=shapes[vis + "merger.mlp.2.weight"][0], patch_size=patch,
            temporal_patch_size=temporal_patch, spatial_merge_size=int(round((merger_in / vision_hidden) ** 0.5)),
            window_size=112, fullatt_block_indexes=full_attention,
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
    )


class NoVisionTower(nn.Module):
    """Stands in for the vision tower of a checkpoint that has none (llama.cpp's text GGUF without its mmproj file):
    text prompts encode as usual; images cannot be."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList()  # nothing to stream

    def forward(self, *args, **kwargs):
        raise ValueError("this text encoder was loaded without a vision tower, so it cannot read images")


class QwenImageTextEncoder(nn.Module):
    """Qwen2.5-VL returning its last hidden state (after the final norm); `vision=False` leaves out the vision tower."""

    def __init__(self, config: Qwen2_5_VLConfig, vision: bool = True):
        super().__init__()
        config._attn_implementation = "sdpa"
        self.model = Qwen2_5_VLModel(config)
        if not vision:
            self.model.visual = NoVisionTower()

    @property
    def has_vision(self) -> bool:
        return not isinstance(self.model.visual, NoVisionTower)

    @property
    def max_length(self) -> int:
        return 1024  # the reference's tokenizer_max_length: Qwen-Image saw prompts up to this many tokens

    def forward(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            use_cache=False,
        )
        return out.last_hidden_state
