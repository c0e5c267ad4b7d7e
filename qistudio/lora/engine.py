"""LoRAs beside a model's weights: load, scale, fuse, unfuse, unload and list them, several at once.

Design note. An unfused LoRA never touches the base model. Each layer it changes gets one forward hook that adds
`scale * (x @ A^T) @ B^T` (a full delta for LoHa, LoKr and `.diff`) to the layer's output, computed in the output's
dtype, summed over every LoRA attached there. State-dict keys, parameter objects and their values stay as loaded,
so saving, FP8 and offloading see the base model, and a new scale or an unload is a dictionary update: the base
weights are never read again. Gradients flow through the hook as through any other op (nothing is detached).

Fusing (`fuse=True`, `fuse_lora`) adds scale * delta into the weight in place (the same Parameter object) to save
the extra matmuls. Unfusing restores the original bits in every dtype. Subtracting the delta again lands on the
original value for most elements; it misses where the sum rounded into the next power of two, or where the weight
is tiny next to the delta. At fuse time we find those elements and keep their indices (int32) and original values
in host memory, never on the GPU. Cost, measured on Gaussian weights: with a delta of 1% of the weight's size
2.4% (float32) / 1.3% (bfloat16) of the elements miss, at 5% about 7% / 5%; that is 4 + itemsize bytes per miss,
roughly 5-20% of the fused layers' size in host RAM. Where it would exceed a copy of the weight, the copy is kept
instead. The fused LoRAs of a layer form a stack: unfusing one below the top unfuses those above it first and fuses
them again after, so each patch meets exactly the state it was made from. If something else wrote the weight
meanwhile (its version counter moved, or its dtype changed), the delta is subtracted without the patch, with a
warning.

The registry of a model's LoRAs is a plain attribute of the module passed to `load_lora`; each touched layer holds
its attachments in another. Neither is a parameter, buffer or submodule, so neither shows in `state_dict()`.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .errors import LoRAError
from .files import read_lora
from .names import TEXT_ENCODER, looks_like_text_encoder, make_target
from .plan import check_fits, check_fusable, is_linear, place
from .updates import Update

logger = logging.getLogger(__name__)

_REGISTRY = "_qistudio_loras"  # on the module given to load_lora: {name: LoadedLoRA}
_LAYER = "_qistudio_lora_layer"  # on each touched layer: _LayerLoRAs
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class LoadedLoRA:
    name: str
    source: str
    scale: float
    layers: list[tuple[str, nn.Module]]  # (label for messages, module)
    fused: bool = False
    device: torch.device | None = None  # where its tensors live (None: beside each layer's weight)


@dataclass(frozen=True)
class LoRAInfo:
    """What `list_loras` reports about one loaded LoRA."""

    name: str
    scale: float
    fused: bool
    num_layers: int
    source: str


@dataclass
class _Patch:
    """What undoing one fused delta exactly needs: the elements subtraction misses, or the whole original."""

    dtype: torch.dtype
    indices: torch.Tensor | None = None
    values: torch.Tensor | None = None
    original: torch.Tensor | None = None


@dataclass
class _LayerLoRAs:
    attached: dict[str, tuple[LoadedLoRA, list[Update]]] = field(default_factory=dict)
    fused: list[tuple[str, dict[str, _Patch]]] = field(default_factory=list)  # bottom to top: (name, patches)
    versions: dict[str, int] = field(default_factory=dict)  # parameter -> its version after our last write
    hook: object | None = None


# --- the forward hook -------------------------------------------------------------------------------------------


def _add_lora_outputs(module, args, kwargs, output):
    x = args[0] if args else kwargs["input"]
    for lora, updates in getattr(module, _LAYER).attached.values():
        if lora.fused or lora.scale == 0:
            continue
        for update in updates:
            output = output + update.output_delta(x, output.dtype, lora.scale)
    return output


# --- exact fuse and unfuse of one parameter ---------------------------------------------------------------------


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    # Compare bit patterns, so -0.0 vs 0.0 and NaNs count as the differences they are.
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def _add_delta(param: torch.Tensor, delta: torch.Tensor) -> _Patch:
    work = torch.promote_types(param.dtype, torch.float32)
    with torch.no_grad():
        original = param.detach().clone()
        delta = delta.to(param.device, work)
        fused = (original.to(work) + delta).to(param.dtype)
        back = (fused.to(work) - delta).to(param.dtype)
        missed = (_bits(back) != _bits(original)).flatten().nonzero().squeeze(1)
        param.copy_(fused)
    size = param.element_size()
    if missed.numel() * (4 + size) >= original.numel() * size or original.numel() >= 2**31:
        return _Patch(param.dtype, original=original.cpu())
    return _Patch(param.dtype, indices=missed.to("cpu", torch.int32), values=original.flatten()[missed].cpu())


def _remove_delta(param: torch.Tensor, delta: torch.Tensor, patch: _Patch, exact: bool) -> None:
    with torch.no_grad():
        if exact and patch.original is not None:
            param.copy_(patch.original.to(param.device))
            return
        work = torch.promote_types(param.dtype, torch.float32)
        back = (param.detach().to(work) - delta.to(param.device, work)).to(param.dtype)
        if exact:
            back.view(-1)[patch.indices.to(param.device, torch.int64)] = patch.values.to(param.device)
        param.copy_(back)


def _deltas(updates: list[Update], scale: float) -> dict[str, torch.Tensor]:
    """{"weight": ..., "bias": ...}: the summed float32 deltas of a layer's updates, times the user's scale."""
    sums: dict[str, torch.Tensor] = {}
    for update in updates:
        for param_name, delta in (("weight", update.weight_delta()), ("bias", update.bias_delta())):
            if delta is not None:
                sums[param_name] = sums[param_name] + delta if param_name in sums else delta
    return {k: v * scale for k, v in sums.items()}


def _fuse_layer(module: nn.Module, lora: LoadedLoRA) -> None:
    layer: _LayerLoRAs = getattr(module, _LAYER)
    patches = {}
    for param_name, delta in _deltas(layer.attached[lora.name][1], lora.scale).items():
        param = getattr(module, param_name)
        patches[param_name] = _add_delta(param, delta)
        layer.versions[param_name] = param._version
    layer.fused.append((lora.name, patches))


def _unfuse_layer(module: nn.Module, name: str, label: str) -> None:
    layer: _LayerLoRAs = getattr(module, _LAYER)
    position = [fused_name for fused_name, _ in layer.fused].index(name)
    exact = all(getattr(module, p)._version == version for p, version in layer.versions.items()) and all(
        getattr(module, p).dtype == patch.dtype for _, patches in layer.fused[position:] for p, patch in patches.items()
    )
    if not exact:
        warnings.warn(
            f"{label}: the weight was changed after the LoRA {name!r} was fused into it (or its dtype changed); "
            "the LoRA is subtracted again, which restores it only to within rounding",
            stacklevel=3,
        )
    above = [fused_name for fused_name, _ in layer.fused[position + 1:]]
    for fused_name, patches in reversed(layer.fused[position:]):
        lora, updates = layer.attached[fused_name]
        for param_name, delta in _deltas(updates, lora.scale).items():
            _remove_delta(getattr(module, param_name), delta, patches[param_name], exact)
    del layer.fused[position:]
    for param_name in layer.versions:
        layer.versions[param_name] = getattr(module, param_name)._version
    for fused_name in above:  # put back, with fresh patches, the LoRAs that sat above this one
        _fuse_layer(module, layer.attached[fused_name][0])


# --- the public API ---------------------------------------------------------------------------------------------


def _registry(module: nn.Module) -> dict[str, LoadedLoRA]:
    registry = getattr(module, _REGISTRY, None)
    if registry is None:
        registry = {}
        setattr(module, _REGISTRY, registry)  # a plain attribute: not a parameter, buffer or submodule
    return registry


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"a LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def _get(module: nn.Module, name: str) -> LoadedLoRA:
    registry = getattr(module, _REGISTRY, None) or {}
    if name not in registry:
        loaded = ", ".join(repr(n) for n in registry) or "none"
        raise LoRAError(f"no LoRA named {name!r} is loaded on this {type(module).__name__} (loaded: {loaded})")
    return registry[name]


def _selected(module: nn.Module, name: str | None) -> list[LoadedLoRA]:
    return list((getattr(module, _REGISTRY, None) or {}).values()) if name is None else [_get(module, name)]


def _unique_name(registry: dict, wanted: str) -> str:
    name, count = wanted, 1
    while name in registry:
        count += 1
        name = f"{wanted}_{count}"
    return name


def _report(name: str, placement, total: int, has_text_encoder: bool) -> None:
    unplaced = placement.unplaced
    hint = ""
    if not has_text_encoder and any(looks_like_text_encoder(k) for k in unplaced):
        hint = "; some are for the text encoder: pass text_encoder=... to apply them"
    if not placement.layers:
        shown = "\n  ".join(unplaced[:20]) + (f"\n  ... and {len(unplaced) - 20} more" if len(unplaced) > 20 else "")
        raise LoRAError(
            f"LoRA {name!r}: none of its {total} tensors matches a layer of the model{hint}. Expected names like "
            f"'transformer_blocks.0.attn.to_q.lora_A.weight' (any of the usual prefixes). Unplaced:\n  {shown}"
        )
    if unplaced:
        warnings.warn(
            f"LoRA {name!r}: applied to {len(placement.layers)} layers; {len(unplaced)} of its {total} tensors "
            f"match no layer and were left out{hint} (first: {', '.join(unplaced[:5])})",
            stacklevel=3,
        )
    logger.info("LoRA %r: %d layers", name, len(placement.layers))


def load_lora(
    module: nn.Module,
    source,
    alpha: float = 1.0,
    name: str | None = None,
    fuse: bool = False,
    *,
    text_encoder: nn.Module | None = None,
    device: torch.device | str | None = None,
) -> str:
    """Attach a LoRA to `module` (usually the DiT) and return its name.

    source: a .safetensors path, a folder, a list of shards, a ModelConfig or a state dict, in any format we
    recognise (names.py, keys.py). alpha: the LoRA's scale (the seed's name; 1 applies it as trained).
    text_encoder: where the file's text-encoder layers go; without it they are left out with a warning.
    fuse: bake it into the weights (faster; `unfuse_lora` restores them exactly).
    device: where the LoRA's tensors live (the compute device when the weights rest in host memory).
    """
    scale = _check_scale(alpha)
    registry = _registry(module)
    if name is not None and name in registry:
        raise LoRAError(f"a LoRA named {name!r} is already loaded; unload_lora(module, {name!r}) first or choose "
                        "another name")
    lora_file = read_lora(source)
    name = name if name is not None else _unique_name(registry, lora_file.default_name)
    targets = [make_target(module)]
    if text_encoder is not None:
        targets.append(make_target(text_encoder, TEXT_ENCODER, "text encoder"))
    try:
        placement = place(lora_file.tensors, targets, lora_file.peft_config)
        _report(name, placement, len(lora_file.tensors), text_encoder is not None)
        check_fits(placement, fuse)
    except LoRAError as e:  # name the file: the tensor names alone do not say which LoRA is at fault
        raise LoRAError(f"{lora_file.description}: {e}") from None
    for layer in placement.layers:
        other = getattr(layer.module, _LAYER, None)
        if other is not None and name in other.attached:
            raise LoRAError(f"{layer.label} already carries a LoRA named {name!r} (loaded through another module); "
                            "choose another name")

    lora = LoadedLoRA(name, lora_file.description, scale, [(layer.label, layer.module) for layer in placement.layers],
                      device=None if device is None else torch.device(device))
    for layer in placement.layers:
        _attach(lora, layer.module, layer.updates)
    registry[name] = lora
    if fuse:
        fuse_lora(module, name)
    return name


def _attach(lora: LoadedLoRA, module: nn.Module, updates: list[Update]) -> None:
    layer = getattr(module, _LAYER, None)
    if layer is None:
        layer = _LayerLoRAs()
        setattr(module, _LAYER, layer)
    weight = getattr(module, "weight", None)
    weight = weight if isinstance(weight, torch.Tensor) else module.bias  # a diff_b-only layer
    # Kept in the layer's compute dtype on the compute device, so the unfused forward moves and casts nothing:
    # an FP8 layer computes in its `compute_dtype`; an offloaded layer's weights rest in host memory but the
    # LoRA (small) stays where the layer runs.
    dtype = weight.dtype if weight.dtype in _COMPUTE_DTYPES else getattr(module, "compute_dtype", None)
    device = lora.device if lora.device is not None else weight.device
    layer.attached[lora.name] = (lora, [update.to(device, dtype) for update in updates])
    if layer.hook is None and is_linear(module):
        layer.hook = module.register_forward_hook(_add_lora_outputs, with_kwargs=True)


def set_lora_scale(module: nn.Module, name: str, scale: float) -> None:
    """Change a loaded LoRA's scale (0 switches it off); a fused one is unfused and fused again at the new scale."""
    lora = _get(module, name)
    scale = _check_scale(scale)
    if lora.fused:
        _unfuse(lora)
        lora.scale = scale
        fuse_lora(module, name)
    else:
        lora.scale = scale


def fuse_lora(module: nn.Module, name: str | None = None) -> None:
    """Bake one LoRA (or all, name=None) into the weights at its current scale."""
    selected = [lora for lora in _selected(module, name) if not lora.fused]
    check_fusable([layer for lora in selected for layer in lora.layers])  # FP8 weights: unfused only
    for lora in selected:
        for _, layer_module in lora.layers:
            _fuse_layer(layer_module, lora)
        lora.fused = True


def _unfuse(lora: LoadedLoRA) -> None:
    if lora.fused:
        for label, layer_module in lora.layers:
            _unfuse_layer(layer_module, lora.name, label)
        lora.fused = False


def unfuse_lora(module: nn.Module, name: str | None = None) -> None:
    """Take one fused LoRA (or all) back out of the weights, restoring them bit for bit; it stays loaded."""
    selected = _selected(module, name)
    for lora in selected:
        fused_only = [label for label, layer_module in lora.layers if not is_linear(layer_module)]
        if lora.fused and fused_only:
            raise LoRAError(
                f"LoRA {lora.name!r} changes {len(fused_only)} layers that are not linear (first: {fused_only[0]}); "
                "its deltas there work fused only. Use unload_lora to take it out, or set_lora_scale to change it"
            )
    for lora in reversed(selected):
        _unfuse(lora)


def unload_lora(module: nn.Module, name: str | None = None) -> None:
    """Remove one LoRA (or all): unfused first if fused; the base weights are as before it was loaded."""
    registry = getattr(module, _REGISTRY, None) or {}
    for lora in reversed(_selected(module, name)):
        _unfuse(lora)
        for _, layer_module in lora.layers:
            layer: _LayerLoRAs = getattr(layer_module, _LAYER)
            del layer.attached[lora.name]
            if not layer.attached:
                if layer.hook is not None:
                    layer.hook.remove()
                delattr(layer_module, _LAYER)
        del registry[lora.name]


def list_loras(module: nn.Module) -> list[LoRAInfo]:
    """The LoRAs loaded on `module`, in load order."""
    return [
        LoRAInfo(lora.name, lora.scale, lora.fused, len(lora.layers), lora.source)
        for lora in (getattr(module, _REGISTRY, None) or {}).values()
    ]


def lora_tensors(module: nn.Module, name: str) -> list[torch.Tensor]:
    """The tensors of a loaded LoRA as the forward uses them (set requires_grad on them to train the LoRA)."""
    lora = _get(module, name)
    return [t for _, layer_module in lora.layers
            for update in getattr(layer_module, _LAYER).attached[name][1] for t in update.tensors.values()]
