"""Tiny GGUF and bitsandbytes files for the tests, quantised by the reference tools where they can.

GGUF: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (and F32 / F16 / BF16) by the gguf package's own quantisers; the K-quants by
qistudio's quantiser (the package has none; tests/test_gguf_quantize.py checks its bytes decode with the package);
Q2_K, Q3_K, IQ4_NL and IQ4_XS as random blocks with small float16 scales (no quantiser for them in Python), which
any decoder must read all the same. NF4 / int8: bitsandbytes' own quantisers (its CPU build runs here), saved in
the layout diffusers and transformers save (QuantState.as_dict(packed=True)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qistudio.weights.gguf_text_encoder_write import released_name as _released_name  # noqa: F401 (tests use it)

RANDOM_BLOCK_TYPES = ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS")
# Byte offset of each float16 scale in a random block, and the scale it gets (values stay near 0.05-0.2).
_RANDOM_SCALES = {"Q2_K": ((80, 0.004), (82, 0.004)), "Q3_K": ((108, 0.002),), "IQ4_NL": ((0, 0.0005),),
                  "IQ4_XS": ((0, 0.00006),)}


def random_blocks(shape: tuple[int, int], qtype: str, seed: int = 0) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, nbytes), dtype=np.uint8)
    for offset, scale in _RANDOM_SCALES[qtype]:
        values = (scale * (0.5 + rng.random(raw.shape[:2]))).astype(np.float16)
        raw[..., offset : offset + 2] = values.view(np.uint8).reshape(*raw.shape[:2], 2)
    if qtype == "IQ4_XS":  # sub-scales 32 + 0..15: small and positive
        raw[..., 2:4] = np.array([0xAA, 0xAA], dtype=np.uint8)  # high bits 2 for all eight
    return raw.reshape(shape[0], -1)


def encode(tensor: torch.Tensor, qtype: str, seed: int = 0):
    """(numpy array, raw GGML type or None) for GGUFWriter.add_tensor."""
    import gguf

    from qistudio.ops.gguf_quantize import QUANTIZABLE, quantize_gguf

    kind = gguf.GGMLQuantizationType[qtype]
    if qtype in ("F32", "F16"):
        return tensor.float().numpy().astype(np.float32 if qtype == "F32" else np.float16), None
    if qtype in RANDOM_BLOCK_TYPES:
        return random_blocks(tuple(tensor.shape), qtype, seed), kind
    if qtype in QUANTIZABLE and qtype not in ("Q8_0", "Q4_0"):
        return quantize_gguf(tensor, qtype).numpy(), kind
    return gguf.quants.quantize(tensor.float().numpy(), kind), kind


def write_gguf(path: Path, state: dict[str, torch.Tensor], type_of, prefix: str = "", metadata=None) -> Path:
    """A GGUF file of `state` ({name: tensor}), each tensor in `type_of(name, tensor)`'s type."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="qwen_image")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in (metadata or {}).items():
        writer.add_array(key, value) if isinstance(value, list) else writer.add_string(key, value)
    for index, (name, tensor) in enumerate(state.items()):
        data, raw = encode(tensor.detach(), type_of(name, tensor), seed=index)
        writer.add_tensor(prefix + name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def mixed_types(types: tuple[str, ...]):
    """type_of for write_gguf: block linears cycle through `types` (falling back to Q8_0, then F32, where a row is
    not whole blocks); everything else in F32, as ComfyUI-GGUF's converter keeps 1-D tensors."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    counter = iter(range(10**6))

    def type_of(name: str, tensor: torch.Tensor) -> str:
        if tensor.dim() != 2 or not name.startswith("transformer_blocks."):
            return "F32"
        wanted = types[next(counter) % len(types)]
        for candidate in (wanted, "Q8_0", "F32"):
            if tensor.shape[1] % GGML_QUANT_SIZES[GGMLQuantizationType[candidate]][0] == 0:
                return candidate
        return "F32"

    return type_of


def reference_wide_dit(num_layers: int = 2):
    """diffusers' QwenImage DiT at width 256 (8 heads of 32): the K-quants' 256-value rows fit its linears."""
    from diffusers import QwenImageTransformer2DModel

    from tiny_models import AXES, TEXT_DIM, _perturb

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers, attention_head_dim=32,
        num_attention_heads=8, joint_attention_dim=TEXT_DIM, axes_dims_rope=AXES,
    )
    return _perturb(model)


def write_bnb_4bit(path: Path, state: dict[str, torch.Tensor], quant_type: str = "nf4", nested: bool = False,
                   blocksize: int = 64, quantize=lambda name, tensor: tensor.dim() == 2) -> Path:
    """A safetensors file with the chosen weights in bitsandbytes' 4-bit layout (its quantiser, CPU build)."""
    import bitsandbytes.functional as F
    from safetensors.torch import save_file

    out = {}
    for name, tensor in state.items():
        if not quantize(name, tensor):
            out[name] = tensor.contiguous()
            continue
        packed, quant_state = F.quantize_4bit(tensor.float(), blocksize=blocksize, quant_type=quant_type,
                                              compress_statistics=nested)
        out[name] = packed
        for part, value in quant_state.as_dict(packed=True).items():
            out[f"{name}.{part}"] = value.contiguous()
    save_file(out, str(path))
    return path


def write_bnb_int8(path: Path, state: dict[str, torch.Tensor], quantize=lambda name, tensor: tensor.dim() == 2):
    """A safetensors file with the chosen weights in bitsandbytes' LLM.int8 layout (weight int8, SCB, weight_format)."""
    import bitsandbytes.functional as F
    from safetensors.torch import save_file

    out = {}
    for name, tensor in state.items():
        if not quantize(name, tensor):
            out[name] = tensor.contiguous()
            continue
        codes, row_scale, _ = F.int8_vectorwise_quant(tensor.half())
        base = name.removesuffix(".weight")
        out[name], out[base + ".SCB"] = codes.contiguous(), row_scale.float().contiguous()
        out[base + ".weight_format"] = torch.tensor(0, dtype=torch.uint8)
    save_file(out, str(path))
    return path


# --- llama.cpp's Qwen2.5-VL files (what convert_hf_to_gguf.py + llama-quantize write) ---------------------------------
# The writers are the package's (qistudio/weights/gguf_text_encoder_write.py, which the pipeline benchmark uses too);
# here each tensor is encoded by the reference tools (encode above) and the gguf package's decoding of it is kept.


def _recording_add(dequantized: dict):
    """An `add` for the package writers that encodes with `encode` and keeps the gguf package's float32 decoding."""

    def add(writer, name: str, tensor: torch.Tensor, qtype: str, index: int) -> None:
        import gguf

        data, raw = encode(tensor.detach().float(), qtype, seed=index)
        writer.add_tensor(name, data, raw_dtype=raw)
        if raw is None:
            dequantized[name] = torch.from_numpy(np.asarray(data, dtype=np.float32)).reshape(tensor.shape)
        else:
            values = gguf.quants.dequantize(np.asarray(data), raw)
            dequantized[name] = torch.from_numpy(values.astype(np.float32)).reshape(tensor.shape)

    return add


def write_llama_cpp_text_model(path: Path, model, type_of, architecture: str = "qwen2vl") -> dict[str, torch.Tensor]:
    """transformers' Qwen2_5_VLForConditionalGeneration -> the language model's GGUF as llama.cpp writes it.
    Returns {released name: the gguf package's dequantisation of what was written}."""
    from qistudio.weights.gguf_text_encoder_write import write_llama_cpp_text_model as write

    by_gguf_name = {}
    names = write(path, model.state_dict().items(), model.config, type_of, architecture, _recording_add(by_gguf_name))
    return {released: by_gguf_name[name] for released, name in names.items()}


def write_llama_cpp_mmproj(path: Path, model, type_of) -> dict[str, torch.Tensor]:
    """The vision tower's mmproj GGUF as convert_hf_to_gguf.py's Qwen2VLVisionModel writes it. Returns {released
    name: the gguf package's dequantisation, joined back}."""
    from qistudio.weights.gguf_text_encoder_write import write_llama_cpp_mmproj as write

    by_gguf_name = {}
    names = write(path, model.state_dict().items(), model.config, type_of, _recording_add(by_gguf_name))
    joined = {}
    for released, parts in names.items():
        decoded = [by_gguf_name[name] for name in parts]
        joined[released] = torch.stack(decoded, 2) if "patch_embed" in released else torch.cat(decoded, 0)
    return joined
