"""Linears that read the same input, run as one GEMM in inference: the 20B text stream's q, k and v projections,
and Qwen-Image 2.1's SwiGLU gate and up projections (ops/linear_swiglu.py: one gated GEMM over the packed weight).

Why only the text stream: its GEMMs have a few hundred rows (2 x 128 text tokens with guidance batched), so one
3072 x 3072 projection fills about a fifth of an H100's SMs, and three in a row leave most of the card idle three
times; packed into one 3072 -> 9216 GEMM they take 0.024 ms instead of 0.058 (H200, bench/gemm_shapes.py), bit-equal.
The image stream's GEMMs (thousands of rows) fill the card either way and gain nothing.

The packed weight is not a copy: the three linears' weights and biases become views into it, so memory stays the
same, a LoRA fused into a weight in place reaches the packed form, and the checkpoint names are untouched. Packing
is checked on every forward (a few pointer comparisons): anything that rebinds a weight (a device move, the block
offloader pointing the weights into its slots, an FP8 conversion, a runtime LoRA's hooks) turns it off for that
block, and the separate linears run as before. Weights that require a gradient are never packed.

A state dict taken after packing holds views of one storage: torch.save keeps them as such; a file writer that
refuses shared tensors needs them cloned first.
"""

from __future__ import annotations

import torch
import torch.nn as nn

_CACHE = "_packed_linears"  # a plain attribute of the owning module: not a parameter, buffer or submodule


def packed_linears(owner: nn.Module, linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (sum of out features, in), bias or None) of `linears` packed, or None where they must run one by
    one (all of them have a bias, or none has).

    Packs on first use (the weights move into one new tensor and become views of it) when every weight owns its
    storage; weights that are views into a storage someone else manages (offload slots, a disk map) are left alone.
    """
    if not _enabled or not _plain(linears):
        _drop(owner)
        return None
    packed = getattr(owner, _CACHE, None)
    if packed is not None and _still_views(packed, linears):  # every forward after the first: a few pointers
        return packed
    _drop(owner)
    if not _same_layout(linears):
        return None
    packed = _views_of_one_storage(linears)  # packed before, and the packed form forgotten (switched off, moved)
    if packed is not None:
        setattr(owner, _CACHE, packed)
        return packed
    if not all(_owns_storage(t) for layer in linears for t in _tensors(layer)):
        return None
    with torch.no_grad():
        weight = torch.cat([layer.weight for layer in linears])  # (sum N_i, K)
        bias = None if linears[0].bias is None else torch.cat([layer.bias for layer in linears])  # (sum N_i,)
        start = 0
        for layer in linears:
            rows = layer.weight.shape[0]
            layer.weight.data = weight[start : start + rows]
            if bias is not None:
                layer.bias.data = bias[start : start + rows]
            start += rows
    setattr(owner, _CACHE, (weight, bias))
    return weight, bias


def release_packed(model: nn.Module) -> None:
    """Forget every packed form in `model` (the views stay valid tensors), so that code about to move or replace the
    weights (the offloaders) leaves no packed copy behind on the device."""
    for module in model.modules():
        _drop(module)


def forget_if_moved(owner: nn.Module, linears: list[nn.Linear]) -> None:
    """Drop `owner`'s packed form unless the linears' weights are still its views (after a device or dtype move)."""
    packed = getattr(owner, _CACHE, None)
    if packed is not None and not _still_views(packed, linears):
        _drop(owner)


def _drop(owner: nn.Module) -> None:
    if getattr(owner, _CACHE, None) is not None:
        setattr(owner, _CACHE, None)


def _tensors(layer: nn.Linear) -> tuple[torch.Tensor, ...]:
    return (layer.weight,) if layer.bias is None else (layer.weight, layer.bias)


def _plain(linears: list[nn.Linear]) -> bool:
    with_bias = linears[0].bias is not None
    for layer in linears:
        # Exactly nn.Linear: FP8 linears and LoRA-wrapped layers compute something else. Hooks (runtime LoRA, the
        # offloader's) must see their own layer called.
        if type(layer) is not nn.Linear or layer._forward_hooks or layer._forward_pre_hooks:
            return False
        if (layer.bias is not None) != with_bias:
            return False
        # Trained weights stay apart (their own storage for the optimiser and for checkpoints): inference only.
        if any(t.requires_grad for t in _tensors(layer)):
            return False
    return True


def _same_layout(linears: list[nn.Linear]) -> bool:
    first = linears[0].weight
    # Meta tensors and the disk offloader's empty placeholders are not weights yet.
    if first.is_meta or not first.is_floating_point() or first.dim() != 2 or first.numel() == 0:
        return False
    return all(layer.weight.device == first.device and layer.weight.dim() == 2
               and layer.weight.shape[1] == first.shape[1]
               and all(t.dtype == first.dtype for t in _tensors(layer))
               and (layer.bias is None or layer.bias.dim() == 1)
               for layer in linears)


def _owns_storage(tensor: torch.Tensor) -> bool:
    return tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def _views_of_one_storage(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The packed (weight, bias) whose views the linears already are, rebuilt from the storage, or None."""
    first = linears[0]
    rows = sum(layer.weight.shape[0] for layer in linears)
    packed = []
    for tensor, shape in zip(_tensors(first), ((rows, first.weight.shape[1]), (rows,))):
        storage = tensor.untyped_storage()
        if tensor.storage_offset() != 0 or storage.nbytes() != shape[0] * tensor[0].numel() * tensor.element_size():
            return None
        packed.append(tensor.new_empty(0).set_(storage, 0, shape))
    weight, bias = packed if len(packed) == 2 else (packed[0], None)
    return (weight, bias) if _still_views((weight, bias), linears) else None


def _still_views(packed: tuple[torch.Tensor, torch.Tensor | None], linears: list[nn.Linear]) -> bool:
    weight, bias = packed
    w_ptr, start = weight.data_ptr(), 0
    for layer in linears:
        rows = layer.weight.shape[0]
        if (layer.weight.data_ptr() != w_ptr + start * weight.stride(0) * weight.element_size()
                or (layer.bias is None) != (bias is None)
                or (bias is not None and layer.bias.data_ptr() != bias.data_ptr() + start * bias.element_size())
                or not layer.weight.is_contiguous() or layer.weight.dtype != weight.dtype):
            return False
        start += rows
    return start == weight.shape[0]


_enabled = True


def set_packed_text_qkv(enabled: bool) -> None:
    """Switch the packed text q/k/v GEMM off (or back on), for comparisons."""
    global _enabled
    _enabled = enabled
