"""Writing a Qwen2.5-VL text encoder as llama.cpp's GGUF files: the language model's file and the vision tower's mmproj.

What convert_hf_to_gguf.py (Qwen2VLModel, Qwen2VLVisionModel) and llama-quantize write, so that the files read back
through gguf_text_encoder.py exactly as ComfyUI users' downloads do: tensor names from the gguf package's own name
map, the metadata those converters write, 1-D tensors in F32, no q/k permutation (the converter permutes only for
architecture "llama", done here too when asked, for the refusal test). The mmproj splits each block's fused
`attn.qkv` into `attn_q/k/v` and the Conv3d patch embedding into its two temporal halves (F16), as the converter does.

`state` is transformers 5's names (`model.language_model.*`, `model.visual.*`: our QwenImageTextEncoder's and
Qwen2_5_VLForConditionalGeneration's), read one tensor at a time, so a 7B model on the GPU is quantised there.
`type_of(gguf name, tensor)` picks each weight's type; `llama_cpp_preset` gives llama-quantize's Q4_K_M / Q8_0 choice.
Each file appears under its name only when complete (fileio.atomic_path). Needs the gguf package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..fileio import atomic_path
from ..ops.gguf_quantize import quantize_gguf

# (writer, gguf name, tensor, GGUF type, index of the tensor) -> None: appends one tensor to the writer.
AddTensor = Callable[[object, str, torch.Tensor, str, int], None]
_MORE_BITS = ("attn_v.weight", "ffn_down.weight")  # llama-quantize's Q4_K_M: these in Q6_K for some layers


def released_name(key: str) -> str:
    """transformers 5's Qwen2.5-VL names -> the released checkpoint's (transformers 4), which the converter reads."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return "visual." + key[len("model.visual."):] if key.startswith("model.visual.") else key


def llama_cpp_preset(preset: str, layers: int) -> Callable[[str, torch.Tensor], str]:
    """type_of for llama-quantize's presets "Q4_K_M" and "Q8_0" (weights whose rows are not whole K-quant blocks
    fall back to Q8_0, then F16), and for the converter's float outputs "BF16" / "F16"."""

    def type_of(name: str, tensor: torch.Tensor) -> str:
        if preset in ("BF16", "F16"):
            return preset
        wanted = preset
        if preset == "Q4_K_M":
            layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
            more_bits = layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2
            wanted = "Q6_K" if name == "output.weight" or (name.endswith(_MORE_BITS) and more_bits) else "Q4_K"
        for candidate, block in ((wanted, 256 if wanted.endswith("_K") else 32), ("Q8_0", 32)):
            if tensor.shape[-1] % block == 0:
                return candidate
        return "F16"

    return type_of


def encode_tensor(tensor: torch.Tensor, qtype: str) -> tuple[np.ndarray, object]:
    """(numpy data, raw GGML type or None) for GGUFWriter.add_tensor; quantised where the tensor is (GPU or CPU)."""
    import gguf

    if qtype in ("F32", "F16"):
        return tensor.float().cpu().numpy().astype(np.float32 if qtype == "F32" else np.float16), None
    if qtype == "BF16":  # numpy has no bfloat16: the bytes, rows of 2 x columns
        return tensor.to(torch.bfloat16).cpu().view(torch.uint8).numpy(), gguf.GGMLQuantizationType.BF16
    return quantize_gguf(tensor, qtype).cpu().numpy(), gguf.GGMLQuantizationType[qtype]


def _add(writer, name: str, tensor: torch.Tensor, qtype: str, index: int) -> None:
    data, raw = encode_tensor(tensor, qtype)
    writer.add_tensor(name, data, raw_dtype=raw)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_llama_cpp_text_model(path: str | Path, state: Iterable[tuple[str, torch.Tensor]], config, type_of,
                               architecture: str = "qwen2vl", add: AddTensor = _add) -> dict[str, str]:
    """The language model's GGUF (the vision tower skipped, as Qwen2VLModel.modify_tensors does). `config`: the
    Qwen2_5_VLConfig. Returns {released name: gguf name}."""
    import gguf

    text = config.text_config
    written = {}
    with atomic_path(path) as temporary:
        writer = gguf.GGUFWriter(str(temporary), arch=architecture)
        writer.add_context_length(text.max_position_embeddings)
        writer.add_embedding_length(text.hidden_size)
        writer.add_block_count(text.num_hidden_layers)
        writer.add_feed_forward_length(text.intermediate_size)
        writer.add_head_count(text.num_attention_heads)
        writer.add_head_count_kv(text.num_key_value_heads)
        writer.add_rope_freq_base(text.rope_parameters["rope_theta"])
        writer.add_layer_norm_rms_eps(text.rms_norm_eps)
        writer.add_rope_dimension_sections([*text.rope_parameters["mrope_section"], 0])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], text.num_hidden_layers)
        for index, (key, tensor) in enumerate(state):
            released = released_name(key)
            if released.startswith("visual."):
                continue
            name = names.get_name(released, try_suffixes=(".weight", ".bias"))
            if architecture == "llama" and released.endswith(("q_proj.weight", "k_proj.weight")):
                heads = text.num_attention_heads if "q_proj" in released else text.num_key_value_heads
                tensor = tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(
                    tensor.shape)
            add(writer, name, tensor.detach(), "F32" if tensor.dim() == 1 else type_of(name, tensor), index)
            written[released] = name
        _finish(writer)
    return written


def write_llama_cpp_mmproj(path: str | Path, state: Iterable[tuple[str, torch.Tensor]], config, type_of,
                           add: AddTensor = _add) -> dict[str, list[str]]:
    """The vision tower's mmproj GGUF (F16 by default in llama.cpp). Returns {released name: its gguf names, in
    the order they join back: rows for attn.qkv, the temporal axis (2) for the patch embedding}."""
    import gguf

    vision = config.vision_config
    written = {}
    with atomic_path(path) as temporary:
        writer = gguf.GGUFWriter(str(temporary), arch="clip")
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type("qwen2.5vl_merger")
        writer.add_vision_projection_dim(config.text_config.hidden_size)
        writer.add_vision_image_size(560)
        writer.add_vision_patch_size(vision.patch_size)
        writer.add_vision_embedding_length(vision.hidden_size)
        writer.add_vision_feed_forward_length(vision.intermediate_size)
        writer.add_vision_block_count(vision.depth)
        writer.add_vision_head_count(vision.num_heads)
        writer.add_vision_use_silu(True)
        writer.add_vision_n_wa_pattern(vision.fullatt_block_indexes[0] + 1)
        writer.add_vision_attention_layernorm_eps(1e-6)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(vision.depth, 3))  # mm.2 needs 3 "blocks"
        for index, (key, tensor) in enumerate(state):
            released = released_name(key)
            if not released.startswith("visual."):
                continue
            tensor = tensor.detach()
            if ".qkv." in released:
                rows = tensor.shape[0] // 3
                parts = [(released.replace("qkv", p), tensor[i * rows : (i + 1) * rows]) for i, p in enumerate("qkv")]
            elif "patch_embed.proj.weight" in released:
                parts = [("v.patch_embd.weight", tensor[:, :, 0]), ("v.patch_embd.weight.1", tensor[:, :, 1])]
            else:
                parts = [(released, tensor)]
            written[released] = []
            for part_name, part in parts:
                name = part_name if part_name.startswith("v.") else names.get_name(part_name, (".weight", ".bias"))
                qtype = "F32" if part.dim() == 1 else ("F16" if part.dim() > 2 else type_of(name, part))
                add(writer, name, part.contiguous(), qtype, index)
                written[released].append(name)
        _finish(writer)
    return written
