"""Checkpoint files -> a ready module: recognise, build on the meta device, check every tensor, assign.

Nothing is allocated until the checkpoint has been matched against the model in full: a missing tensor, a tensor
of the wrong shape or dtype (integer or bool where a weight is float) or one that belongs nowhere raises one
`CheckpointError` listing them all, before any weight reaches the GPU. Then each tensor goes from the memory map
straight to its device and dtype, one at a time, so peak host memory stays near one tensor rather than the model's
size. Every placed weight is checked for NaN and infinity where it lands (finite.py: one aminmax pass, one
synchronisation for the whole model); weights streamed from disk are checked the first time they are read.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..models.controlnet import QwenImageBlockwiseControlNet, controlnet_config_from_shapes
from ..models.dit import QwenImageDiT, dit_config_from_shapes
from ..models.instantx_controlnet import QwenImageInstantXControlNet, instantx_config_from_shapes
from ..models.text_encoder import QwenImageTextEncoder, text_encoder_config_from_shapes
from ..models.vae import QwenImageVAE, VAEConfig
from .build21 import build_qwen21
from .errors import CheckpointError
from .finite import FiniteCheck, is_finite
from .formats import CONTROLNET, DIT, IGNORED, TEXT_ENCODER, VAE, Layout, detect_layout, fp8_scale_key
from .jsonfile import read_json
from .safetensors_io import TensorSource, is_float_dtype
from .gguf_text_encoder import build_llama_cpp_text_encoder
from .quantized_source import is_quantized, open_source, place_quantized  # GGUF, bitsandbytes

_FLOAT8 = {"F8_E4M3", "F8_E5M2", "float8_e4m3fn", "float8_e5m2"}


@contextlib.contextmanager
def empty_parameters():
    """Create parameters on the meta device (no memory, no init); buffers stay real, so none need rebuilding."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _config_path(files: list[Path]) -> Path | None:
    path = files[0].parent / "config.json"
    return path if path.exists() else None


def build_described(kind: str, shapes: dict[str, tuple[int, ...]], source: TensorSource) -> nn.Module:
    """`build_empty` for a checkpoint's files and the config.json beside them; a config or a set of tensors that
    describes no buildable model is one `CheckpointError` naming the files."""
    if kind == TEXT_ENCODER and (model := build_llama_cpp_text_encoder(shapes, source)) is not None:
        return model  # llama.cpp's Qwen2.5-VL files: the size is in their metadata
    config_path = _config_path(source.files)
    config_json = read_json(config_path) if config_path is not None else None
    try:
        return build_empty(kind, shapes, config_json)
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError, RuntimeError) as e:
        described = ", ".join(str(f) for f in source.files) + (f" with {config_path}" if config_path else "")
        raise CheckpointError(f"cannot build a {kind} model from {described}: {type(e).__name__}: {e}") from None


def _check_rope_axes(axes, head_dim: int) -> None:
    """config.json's `axes_dims_rope`: three positive even sizes (RoPE rotates pairs) that fill the head."""
    sizes = list(axes) if isinstance(axes, (list, tuple)) else None
    if (sizes is None or len(sizes) != 3 or sum(1 for n in sizes if type(n) is int and n > 0 and n % 2 == 0) != 3
            or sum(sizes) != head_dim):
        raise ValueError(f"axes_dims_rope={axes!r}: expected three positive even sizes summing to the head size "
                         f"{head_dim}")


def _check_latent_statistics(cfg: VAEConfig) -> None:
    """The VAE's per-channel latent mean and std (VAEConfig checks their count): finite numbers, the std positive
    (latents are divided by it)."""
    for name in ("latents_mean", "latents_std"):
        values = getattr(cfg, name)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not numbers or (name == "latents_std" and min(values) <= 0):
            shown = list(values)[:4] + (["..."] if len(values) > 4 else [])
            rule = "positive numbers" if name == "latents_std" else "finite numbers"
            raise ValueError(f"{name} must hold {rule} (one per latent channel); got {shown}")


def build_empty(kind: str, shapes: dict[str, tuple[int, ...]], config_json: dict | None) -> nn.Module:
    """The model a checkpoint describes, with meta parameters. `shapes` are in our names."""
    with empty_parameters():
        if (qwen21 := build_qwen21(kind, shapes, config_json)) is not None:  # Qwen-Image 2.1's models
            return qwen21
        if kind == DIT:
            config = dit_config_from_shapes(shapes, config_json)
            _check_rope_axes(config.axes_dim, config.head_dim)
            return QwenImageDiT(config)
        if kind == VAE:
            cfg = VAEConfig.from_shapes(shapes)
            if config_json and "latents_mean" in config_json:
                cfg = VAEConfig.from_diffusers_config(config_json)
            _check_latent_statistics(cfg)
            return QwenImageVAE(cfg)
        if kind == TEXT_ENCODER:
            if config_json and "vision_config" in config_json:
                from transformers import Qwen2_5_VLConfig

                try:
                    config = Qwen2_5_VLConfig.from_dict(config_json)
                except Exception as e:  # noqa: BLE001 - transformers' field validators raise their own types
                    raise ValueError(f"{type(e).__name__}: {' '.join(str(e).split())}") from None
                return QwenImageTextEncoder(config)
            return QwenImageTextEncoder(text_encoder_config_from_shapes(shapes))
        if kind == CONTROLNET and "controlnet_x_embedder.weight" in shapes:
            config = instantx_config_from_shapes(shapes, config_json)
            _check_rope_axes(config.axes_dim, config.head_dim)
            return QwenImageInstantXControlNet(config)
        if kind == CONTROLNET:
            return QwenImageBlockwiseControlNet(controlnet_config_from_shapes(shapes))
    raise CheckpointError(f"loading a {kind!r} checkpoint is not supported yet")


@dataclass
class Match:
    """Our parameter name -> checkpoint tensor name, for every parameter of the model."""

    sources: dict[str, str]
    ignored: list[str]


def _fp8_scale_problem(source: TensorSource, key: str) -> str | None:
    """Why the scale stored beside a float8 weight cannot dequantise it, or None."""
    scale_key = fp8_scale_key(key, source)
    if scale_key is None:
        return None
    shape, rows = source.shapes[scale_key], source.shapes[key][0] if source.shapes[key] else None
    if not is_float_dtype(source.dtypes[scale_key]):
        return f"{scale_key}: the scale of {key} is {source.dtypes[scale_key]}, not a float"
    if shape not in ((), (1,)) and not (len(source.shapes[key]) == 2 and shape == (rows,)):
        return f"{scale_key}: scale {list(shape)} for weight {list(source.shapes[key])} (one per tensor or per row)"
    return None


def match_checkpoint(model: nn.Module, source: TensorSource, layout: Layout) -> Match:
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    sources: dict[str, str] = {}
    ignored, unexpected, mismatched, not_float, seen = [], [], [], [], set()
    for key in source.keys():
        ours = layout.key_map(key)
        where = source.file_of[key].name
        if ours == IGNORED:
            ignored.append(key)
            continue
        if ours not in expected:
            unexpected.append(f"{key} {list(source.shapes[key])} ({where})")
            continue
        seen.add(ours)
        if source.shapes[key] != expected[ours]:
            mismatched.append(f"{key}: file {list(source.shapes[key])} ({where}), model {list(expected[ours])}")
        elif not is_float_dtype(source.dtypes[key]) and not is_quantized(source, key):
            not_float.append(f"{key}: {source.dtypes[key]} ({where}); a weight must be a float")
        elif source.dtypes[key] in _FLOAT8 and (problem := _fp8_scale_problem(source, key)):
            mismatched.append(f"{problem} ({where})")
        else:
            sources[ours] = key
    missing = sorted(set(expected) - seen)
    problems = (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched),
                ("not floating point", not_float))
    if any(items for _, items in problems):
        files = ", ".join(str(f) for f in source.files)
        lines = [f"checkpoint {files} does not fit the {layout.name} model built from it:"]
        for title, items in problems:
            if items:
                shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
                lines.append(f"  {len(items)} {title}:\n    {shown}")
        raise CheckpointError("\n".join(lines))
    return Match(sources, ignored)


def _read_weight(source: TensorSource, key: str, dtype: torch.dtype, device) -> torch.Tensor:
    tensor = source.get(key)
    if source.dtypes[key] in _FLOAT8:
        # Float8 checkpoints: dequantise with the per-tensor scale when the file has one.
        scale_key = fp8_scale_key(key, source)
        tensor = tensor.to(device).float()
        if scale_key is not None:
            scale = source.get(scale_key).to(device).float()
            if scale.dim() == 1 and scale.numel() == tensor.shape[0] and tensor.dim() == 2:
                scale = scale[:, None]  # per-output-channel scales (ours, and other tools' row-wise ones)
            tensor = tensor * scale
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device)


def _not_finite_reason(source: TensorSource, key: str, dtype: torch.dtype) -> str:
    """Why weight `key` is not finite once loaded: in the file, in its FP8 scale, or overflowing `dtype`."""
    if not is_finite(source.get(key)):
        return f"{source.where(key)} holds NaN or infinity"
    scale_key = fp8_scale_key(key, source) if source.dtypes[key] in _FLOAT8 else None
    if scale_key is not None and not is_finite(source.get(scale_key)):
        return f"{source.where(scale_key)} (the scale of {key!r}) holds NaN or infinity"
    largest = float(_read_weight(source, key, torch.float32, "cpu").abs().max())
    return (f"{source.where(key)} holds values up to {largest:.4g}, beyond {dtype}'s range (largest "
            f"{torch.finfo(dtype).max:.4g}): load it in torch.bfloat16 or torch.float32")


def _raise_not_finite(source: TensorSource, keys: list[str], dtype: torch.dtype) -> None:
    reasons = [_not_finite_reason(source, key, dtype) for key in keys[:10]]
    more = f"\n  ... and {len(keys) - 10} more tensors" if len(keys) > 10 else ""
    if len(reasons) == 1:
        raise CheckpointError(f"{reasons[0]}; the model would produce NaN images")
    raise CheckpointError(f"{len(keys)} weights are not finite (the model would produce NaN images):\n  "
                          + "\n  ".join(reasons) + more)


def read_weight(source: TensorSource, key: str, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """One checkpoint tensor as the model holds it (FP8 files dequantised), on `device` in `dtype`.

    A tensor is checked for NaN and infinity the first time it is read from `source`.
    """
    tensor = _read_weight(source, key, dtype, device)
    if key not in source.verified:
        if tensor.is_floating_point() and not is_finite(tensor):
            _raise_not_finite(source, [key], dtype)
        source.verified.add(key)
    return tensor


def assign_weights(model: nn.Module, source: TensorSource, match: Match, dtype: torch.dtype, device,
                   defer=None) -> dict[str, tuple[str, torch.Size]]:
    """Replace every meta parameter by its tensor from the checkpoint, on `device` in `dtype`.

    Parameters for which `defer(name)` is true are not read: they get an empty placeholder, and the returned
    {name: (checkpoint key, shape)} says where to read them later (weights streamed from disk). Every placed
    weight is checked for NaN and infinity, on its device, with one synchronisation at the end.
    """
    deferred = {}
    check = FiniteCheck()
    for name, key in match.sources.items():
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        if defer is not None and defer(name):
            deferred[name] = (key, module._parameters[param_name].shape)
            value = torch.empty(0, dtype=dtype)
        else:
            value = _read_weight(source, key, dtype, device)
            check.add(key, value)
        module._parameters[param_name] = nn.Parameter(value, requires_grad=False)
    failures = check.failures()
    if failures:
        _raise_not_finite(source, failures, dtype)
    source.verified.update(check.names)
    for module in model.modules():
        for buffer_name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[buffer_name] = buffer.to(device)
    return deferred


def load_model(
    files: list[str | Path], dtype: torch.dtype = torch.bfloat16, device="cpu", kind: str | None = None
) -> tuple[str, nn.Module]:
    """Load the model held by `files` (one checkpoint, possibly sharded). Returns (kind, module in eval mode)."""
    kind, model, _, source = load_model_deferred(files, dtype, device, kind)
    source.close()
    return kind, model


def load_model_deferred(files, dtype: torch.dtype = torch.bfloat16, device="cpu", kind: str | None = None,
                        defer=None) -> tuple[str, nn.Module, dict, TensorSource]:
    """As `load_model`, leaving the parameters `defer(name)` selects unread; returns them and the open source."""
    source = open_source(files)
    layout = detect_layout(source.keys(), ", ".join(map(str, source.files)))
    if kind is not None and layout.kind != kind:
        raise CheckpointError(f"{', '.join(map(str, source.files))} holds a {layout.name}, not a {kind}")
    our_shapes = {layout.key_map(k): s for k, s in source.shapes.items() if layout.key_map(k) != IGNORED}
    model = build_described(layout.kind, our_shapes, source)
    match = match_checkpoint(model, source, layout)
    place_quantized(model, source, match.sources, dtype, device)  # linears that keep their weights quantised
    deferred = assign_weights(model, source, match, dtype, device, defer)
    return layout.kind, model.eval(), deferred, source

