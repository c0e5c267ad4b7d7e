"""A LoRA's tensors against target models: which module each layer lands in, what it changes, what is left over."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import LoRAError
from .keys import build_updates, group_by_layer
from .names import Target, resolve
from .updates import Update


@dataclass
class PlacedLayer:
    target: Target
    module_name: str
    updates: list[Update]
    keys: list[str]  # the file's tensor names for this layer

    @property
    def label(self) -> str:
        return f"{self.target.label}: {self.module_name}"

    @property
    def module(self) -> nn.Module:
        return self.target.root.get_submodule(self.module_name)


@dataclass
class Placement:
    layers: list[PlacedLayer]
    unplaced: list[str]  # tensor names that fit no module (or follow no LoRA grammar)


def place(tensors: dict[str, torch.Tensor], targets: list[Target], peft_config: dict | None = None) -> Placement:
    entries, unparsed = group_by_layer(tensors)
    layers: dict[tuple[int, str], PlacedLayer] = {}
    unplaced = list(unparsed)
    for entry in entries.values():
        updates = build_updates(entry, peft_config)
        found = resolve(entry.key, targets) if updates else None
        if found is None:
            unplaced += entry.names
            continue
        target, module_name = found
        slot = (id(target.root), module_name)
        if slot in layers:
            raise LoRAError(
                f"two entries of the LoRA land on the same layer {module_name!r}: {layers[slot].keys[0]!r} and "
                f"{entry.names[0]!r}; a file should name each layer once"
            )
        layers[slot] = PlacedLayer(target, module_name, updates, entry.names)
    return Placement(list(layers.values()), unplaced)


def is_linear(module: nn.Module) -> bool:
    """A layer computing x @ weight^T + bias: nn.Linear, or any class that keeps its interface (FP8 linears)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.ndim == 2 and hasattr(module, "in_features")


def _fuse_problem(module: nn.Module) -> str | None:
    """Why a LoRA cannot be fused into this layer (an 8-bit float weight), or None."""
    weight = getattr(module, "weight", None)
    if hasattr(module, "weight_shape"):  # GGUF / bitsandbytes storage (memory/quant_linear.py)
        return (f"{type(module).__name__} stores its weight quantised ({module.quant_type}): unfused LoRAs work on "
                "it, but a delta cannot be fused into its blocks; load it with fuse=False")
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.element_size() == 1:
        return (f"{type(module).__name__} stores its weight in {weight.dtype}: unfused LoRAs work on FP8 weights, "
                "but fusing would round the LoRA into 8 bits and lose its precision; load it with fuse=False")
    return None


def check_fusable(layers: list[tuple[str, nn.Module]]) -> None:
    """Every layer can take a fused delta; else one error listing those that cannot, before anything is fused."""
    problems = [f"{label}: {problem}" for label, module in layers if (problem := _fuse_problem(module))]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise LoRAError(f"cannot fuse into {len(problems)} layers:\n  {shown}")


def _mismatch(update: Update, module: nn.Module) -> str | None:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    inner = update.inner_problem()
    if inner is not None:
        return inner
    if update.weight_shape is not None:
        if not isinstance(weight, torch.Tensor):
            return f"{type(module).__name__} has no weight to change"
        shape = tuple(getattr(module, "weight_shape", weight.shape))  # a quantised layer: its real (out, in)
        if shape != update.weight_shape:
            return f"the {update.kind} delta is {list(update.weight_shape)}, the weight {list(shape)}"
    if update.bias_shape is not None:
        if not isinstance(bias, torch.Tensor):
            return f"{type(module).__name__} has no bias for diff_b"
        if tuple(bias.shape) != update.bias_shape:
            return f"diff_b is {list(update.bias_shape)}, the bias {list(bias.shape)}"
    return None


def check_fits(placement: Placement, fuse: bool) -> None:
    """Every placed update fits its module's shapes (else: a LoRA for another model), one error listing all."""
    problems = []
    for layer in placement.layers:
        module = layer.module
        for update in layer.updates:
            problem = _mismatch(update, module)
            if problem is None and not fuse and not is_linear(module):
                problem = (f"{type(module).__name__} is not a linear layer: a {update.kind} delta on it can only be "
                           "fused; load this LoRA with fuse=True")
            if problem:
                problems.append(f"{layer.keys[0]} -> {layer.label}: {problem}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise LoRAError(f"the LoRA does not fit the model ({len(problems)} layers; a LoRA for another model?):\n  "
                        f"{shown}")
    if fuse:
        check_fusable([(layer.label, layer.module) for layer in placement.layers])
