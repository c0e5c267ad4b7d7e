"""llama.cpp's Qwen2.5-VL GGUF files as our text encoder: the language model's file and, for Edit, the vision tower's
mmproj file, under our names, with the model's size from their metadata.

Design note. ComfyUI users run Qwen-Image with the text encoder as llama.cpp's converter (convert_hf_to_gguf.py)
and llama-quantize wrote it: `token_embd`, `blk.N.attn_q` / `attn_k` / `attn_v` (with biases), `attn_output`,
`ffn_gate` / `ffn_up` / `ffn_down`, `attn_norm`, `ffn_norm`, `output_norm`, `output` (the unused lm_head), with
`general.architecture = "qwen2vl"` and the sizes under `qwen2vl.*`. The vision tower is not in that file: llama.cpp
writes it to a separate "mmproj" GGUF (`general.architecture = "clip"`, `v.blk.N.*`, `mm.0` / `mm.2`).

- No q/k rows are permuted. llama.cpp's converter permutes q/k rows only for LLaMA-family models (LlamaModel.permute,
  from the HF checkpoint's half-split rotary pairs to GGML's interleaved ones); Qwen2VLModel is a plain TextModel
  that writes every tensor as transformers holds it, because Qwen2 runs NeoX-style (half-split) RoPE in both. The
  ComfyUI-GGUF loader agrees: it undoes the permutation for architecture "llama" only, never for "qwen2vl".
  tests/test_gguf_text_encoder.py proves the rows right by the hidden states.
- The mmproj writer (Qwen2VLVisionModel) splits two tensors, which are joined back here: each block's fused
  `attn.qkv` into `attn_q`, `attn_k`, `attn_v` (rows, in that order), and the (out, in, 2, kh, kw) Conv3d patch
  embedding into its two temporal halves `v.patch_embd.weight` and `v.patch_embd.weight.1`. A joined tensor is
  decoded to a float tensor when read (the vision tower is ~0.7 B parameters, usually F16 in the file); every
  other weight keeps its GGUF type, so the decoder linears stay quantised like the DiT's.
- A language-model file without its mmproj builds a text encoder without a vision tower: text-to-image works, and a
  request with edit images is refused before any model runs, naming the file and what to add.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .formats import IGNORED, TEXT_ENCODER, Layout

TEXT_ARCHITECTURE = "qwen2vl"  # llama.cpp's name for the Qwen2-VL / Qwen2.5-VL language model
VISION_ARCHITECTURE = "clip"  # every llama.cpp mmproj file
VISION_PROJECTOR = "qwen2.5vl_merger"  # Qwen2.5-VL's tower (Qwen2-VL's "qwen2vl_merger" has LayerNorms, not ours)
LAYOUT_NAME = "Qwen2.5-VL (llama.cpp GGUF)"
MMPROJ_HINT = ("add its vision tower, llama.cpp's mmproj GGUF for Qwen2.5-VL-7B (e.g. "
               "Qwen2.5-VL-7B-Instruct-mmproj-F16.gguf), to the text encoder's files: "
               "ModelConfig(path=[TEXT_ENCODER.gguf, MMPROJ.gguf]) or qistudio generate --text-encoder "
               "TEXT_ENCODER.gguf --text-encoder MMPROJ.gguf")

_LM, _VISUAL = "model.language_model.", "model.visual."
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
_VISION_BLOCK_NAMES = {
    "ln1": "norm1", "ln2": "norm2", "attn_qkv": "attn.qkv", "attn_out": "attn.proj", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
_TOP_NAMES = {"token_embd.weight": _LM + "embed_tokens.weight", "output_norm.weight": _LM + "norm.weight",
              "output.weight": IGNORED, "v.patch_embd.weight": _VISUAL + "patch_embed.proj.weight",
              "v.post_ln.weight": _VISUAL + "merger.ln_q.weight"}
_BLOCK = re.compile(r"(v\.)?blk\.(\d+)\.(\w+)\.(weight|bias)")
_MERGER = re.compile(r"mm\.([02])\.(weight|bias)")
_SPLIT_QKV = re.compile(r"v\.blk\.(\d+)\.attn_([qkv])\.(weight|bias)")
PATCH_HALVES = ("v.patch_embd.weight", "v.patch_embd.weight.1")


def text_encoder_key(key: str) -> str:
    """A llama.cpp tensor name -> ours (transformers 5's Qwen2_5_VLModel names), or IGNORED (the lm_head)."""
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    if match := _BLOCK.fullmatch(key):
        vision, index, part, kind = match.groups()
        names, prefix = (_VISION_BLOCK_NAMES, _VISUAL + "blocks.") if vision else (_BLOCK_NAMES, _LM + "layers.")
        if part in names:
            return f"{prefix}{index}.{names[part]}.{kind}"
    if match := _MERGER.fullmatch(key):
        return f"{_VISUAL}merger.mlp.{match[1]}.{match[2]}"
    return key  # unknown: reported as unexpected by the strict match


def llama_cpp_layout(keys) -> Layout | None:
    """The layout of llama.cpp's Qwen2.5-VL files (a language model, with or without its mmproj), else None."""
    if "token_embd.weight" in keys or any(k.startswith("v.blk.") for k in keys):
        return Layout(TEXT_ENCODER, LAYOUT_NAME, text_encoder_key)
    return None


# --- tensors the mmproj writer split, joined back ------------------------------------------------------------------


@dataclass(frozen=True)
class Join:
    """One tensor stored as several: `torch.stack(parts, dim)` if `stack`, else `torch.cat(parts, dim)`."""

    parts: tuple[str, ...]
    dim: int
    stack: bool


def joined_tensors(names) -> dict[str, Join]:
    """{joined name: Join} for the split tensors among `names` (an mmproj file's tensor names)."""
    joins: dict[str, Join] = {}
    for name in names:
        if (match := _SPLIT_QKV.fullmatch(name)) and match[2] == "q":
            index, kind = match[1], match[3]
            parts = tuple(f"v.blk.{index}.attn_{p}.{kind}" for p in "qkv")
            if all(part in names for part in parts):
                joins[f"v.blk.{index}.attn_qkv.{kind}"] = Join(parts, 0, False)
    if all(half in names for half in PATCH_HALVES):  # (out, in, kh, kw) twice -> (out, in, 2, kh, kw)
        joins["v.patch_embd.weight"] = Join(PATCH_HALVES, 2, True)
    return joins


def joined_shape(shapes: list[tuple[int, ...]], join: Join) -> tuple[int, ...] | None:
    """The joined tensor's shape, or None when the parts cannot be joined."""
    first = shapes[0]
    if join.stack:
        return (*first[: join.dim], len(shapes), *first[join.dim :]) if all(s == first for s in shapes) else None
    rest = [s[: join.dim] + s[join.dim + 1 :] for s in shapes]
    if any(len(s) != len(first) for s in shapes) or any(r != rest[0] for r in rest):
        return None
    return (*first[: join.dim], sum(s[join.dim] for s in shapes), *first[join.dim + 1 :])


def check_architecture(path: Path, metadata: dict, names) -> None:
    """One clear error for a llama.cpp model that is not Qwen2.5-VL (another language model, another projector)."""
    architecture = metadata.get("general.architecture")
    if "token_embd.weight" in names and architecture != TEXT_ARCHITECTURE:
        raise CheckpointError(f"{path}: a llama.cpp language model of architecture {architecture!r}; qistudio reads "
                              f"the Qwen2.5-VL text encoder ({TEXT_ARCHITECTURE!r})")
    projector = metadata.get("clip.vision.projector_type", metadata.get("clip.projector_type"))
    if any(n.startswith("v.blk.") for n in names) and projector not in (None, VISION_PROJECTOR):
        raise CheckpointError(f"{path}: an mmproj file for projector {projector!r}; Qwen-Image's text encoder is "
                              f"Qwen2.5-VL ({VISION_PROJECTOR!r})")


# --- the model's config, from the metadata ---------------------------------------------------------------------------


def _number(metadata: dict, key: str, default, kind=int):
    value = metadata.get(key, default)
    if value is None:
        raise CheckpointError(f"the GGUF metadata lacks {key!r}, which sizes the text encoder")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or value <= 0 or (kind is int and value != int(value)):
        raise CheckpointError(f"the GGUF metadata's {key} = {value!r}; expected a positive {kind.__name__}")
    return kind(value)


def _text_config(metadata: dict, shapes: dict[str, tuple[int, ...]]) -> dict:
    arch = TEXT_ARCHITECTURE
    vocab, hidden = shapes[_LM + "embed_tokens.weight"]
    heads = _number(metadata, f"{arch}.attention.head_count", None)
    head_dim = hidden // heads
    sections = metadata.get(f"{arch}.rope.dimension_sections", [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16])
    sections = [s for s in sections if s] if isinstance(sections, list) else None
    if not sections or not all(isinstance(s, int) and s > 0 for s in sections) or 2 * sum(sections) != head_dim:
        raise CheckpointError(f"the GGUF metadata's {arch}.rope.dimension_sections does not split the head of "
                              f"{head_dim} (hidden {hidden} / {heads} heads) into rotary pairs")
    return dict(
        vocab_size=vocab, hidden_size=_number(metadata, f"{arch}.embedding_length", hidden),
        num_hidden_layers=_number(metadata, f"{arch}.block_count", None),
        intermediate_size=_number(metadata, f"{arch}.feed_forward_length", None),
        num_attention_heads=heads, num_key_value_heads=_number(metadata, f"{arch}.attention.head_count_kv", heads),
        rms_norm_eps=_number(metadata, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6, float),
        rope_theta=_number(metadata, f"{arch}.rope.freq_base", 1_000_000.0, float),
        max_position_embeddings=_number(metadata, f"{arch}.context_length", 128000),
        rope_scaling={"type": "mrope", "mrope_section": sections},
    )


def _vision_config(metadata: dict, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Qwen2.5-VL's vision config: sizes from the tensors, heads and the window pattern from the mmproj metadata."""
    hidden, _, temporal, patch, _ = shapes[_VISUAL + "patch_embed.proj.weight"]
    depth = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(_VISUAL + "blocks."))
    merger_in = shapes[_VISUAL + "merger.mlp.0.weight"][1]
    every = _number(metadata, "clip.vision.n_wa_pattern", 8)  # a full-attention block after every `every` - 1
    return dict(
        depth=depth, hidden_size=hidden, intermediate_size=shapes[_VISUAL + "blocks.0.mlp.gate_proj.weight"][0],
        num_heads=_number(metadata, "clip.vision.attention.head_count", max(1, hidden // 80)),
        out_hidden_size=shapes[_VISUAL + "merger.mlp.2.weight"][0], patch_size=patch, temporal_patch_size=temporal,
        spatial_merge_size=int(round((merger_in / hidden) ** 0.5)), window_size=112,
        fullatt_block_indexes=[i for i in range(every - 1, depth, every)] or [depth - 1],
    )


def text_encoder_config(text_metadata: dict, vision_metadata: dict | None, shapes: dict[str, tuple[int, ...]]):
    """(Qwen2_5_VLConfig, whether it has a vision tower) for llama.cpp files, from their metadata and `shapes` (our
    names). Without an mmproj file the vision part is transformers' default (built on the meta device, then dropped)."""
    from transformers import Qwen2_5_VLConfig

    vision = any(k.startswith(_VISUAL) for k in shapes)
    try:
        return Qwen2_5_VLConfig(
            text_config=_text_config(text_metadata, shapes),
            vision_config=_vision_config(vision_metadata or {}, shapes) if vision else None,
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        ), vision
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"cannot size Qwen2.5-VL from the llama.cpp files: {type(e).__name__}: {e}") from None


def build_llama_cpp_text_encoder(shapes: dict[str, tuple[int, ...]], source):
    """Our text encoder (meta parameters) for llama.cpp's files in `source`, else None (any other checkpoint)."""
    metadata = getattr(source, "gguf_metadata", lambda: {})()
    by_architecture = {m.get("general.architecture"): (path, m) for path, m in metadata.items()}
    if TEXT_ARCHITECTURE not in by_architecture:
        if VISION_ARCHITECTURE in by_architecture:
            raise CheckpointError(f"{by_architecture[VISION_ARCHITECTURE][0]}: an mmproj file holds only the vision "
                                  "tower; give it together with the Qwen2.5-VL language model's GGUF file")
        return None
    from ..models.text_encoder import QwenImageTextEncoder
    from .build import empty_parameters

    vision_metadata = by_architecture.get(VISION_ARCHITECTURE, (None, None))[1]
    config, vision = text_encoder_config(by_architecture[TEXT_ARCHITECTURE][1], vision_metadata, shapes)
    with empty_parameters():
        return QwenImageTextEncoder(config, vision=vision)


def missing_vision_message(files) -> str:
    shown = ", ".join(str(f) for f in files)
    return f"edit images need the text encoder's vision tower, which {shown} does not hold: {MMPROJ_HINT}"
