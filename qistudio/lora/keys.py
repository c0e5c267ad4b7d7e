"""LoRA tensor names -> one entry per layer: the key grammar of every format we read, and its updates.

A tensor name is `<layer key>.<part>`: the layer key is whatever the file calls the layer (with its prefixes and
kohya underscores; names.py finds the module), the part says what the tensor is. Parts recognised:

  low rank  `lora_A`/`lora_B` (PEFT, diffusers, DiffSynth; an adapter name such as `.default.` may follow) and
            `lora_down`/`lora_up` (kohya, ComfyUI, lightx2v), each ending in `.weight`, plus an optional `.alpha`
  LoHa      `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b` (+ `.alpha`)
  LoKr      `lokr_w1` or `lokr_w1_a`/`lokr_w1_b`, and `lokr_w2` or `lokr_w2_a`/`lokr_w2_b` (+ `.alpha`)
  dense     `diff` (added to the weight) and `diff_b` (added to the bias), as lightx2v files carry

A PEFT adapter config (adapter_config.json, or diffusers' `lora_adapter_metadata`) supplies the alpha of layers
whose file stores none.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .errors import LoRAError
from .names import peel
from .updates import Dense, LoHa, LoKr, LowRank, Update

_LOW_RANK = re.compile(r"^(?P<layer>.+)\.(?P<part>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?\.weight$")
_OTHER = re.compile(
    r"^(?P<layer>.+)\.(?P<part>alpha|diff|diff_b|dora_scale"
    r"|hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t[12])$"
)
_LOW_RANK_PART = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up"}


@dataclass
class LayerEntry:
    """Everything a file holds for one layer, under part names ("down", "up", "alpha", "hada_w1_a", ...)."""

    key: str  # the layer as the file names it, e.g. "diffusion_model.transformer_blocks.0.attn.to_q"
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # the file's tensor names, for messages


def group_by_layer(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, LayerEntry], list[str]]:
    """Group tensor names by layer; names that follow no LoRA grammar come back in the second list."""
    entries: dict[str, LayerEntry] = {}
    unparsed: list[str] = []
    for name, tensor in state_dict.items():
        match = _LOW_RANK.match(name)
        if match:
            part = _LOW_RANK_PART[match["part"]]
        else:
            match = _OTHER.match(name)
            if not match:
                unparsed.append(name)
                continue
            part = match["part"]
        entry = entries.setdefault(match["layer"], LayerEntry(match["layer"]))
        if part in entry.parts:
            raise LoRAError(
                f"the LoRA holds two tensors for the same part of layer {match['layer']!r}: "
                f"{[n for n in entry.names if n != name][0]!r} and {name!r} (two adapters in one file?); "
                "keep one of them"
            )
        entry.parts[part] = tensor
        entry.names.append(name)
    return entries, unparsed


def _alpha_from_config(config: dict | None, layer: str, rank: int) -> float | None:
    """The alpha a PEFT adapter config gives this layer: alpha_pattern, else lora_alpha (rsLoRA folded in)."""
    if not config or "lora_alpha" not in config:
        return None
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        # PEFT's own matching: "^name" is anchored at the start, anything else matches a dotted suffix.
        regex = rf"{pattern}(\.|$)" if pattern.startswith("^") else rf"(.*\.)?({pattern})$"
        if re.match(regex, layer) or re.match(regex, peel(layer)[0]):
            alpha = float(value)
            break
    if config.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(rank); as an ordinary alpha over rank that is alpha * sqrt(rank).
        alpha *= math.sqrt(rank)
    return alpha


def _squeeze_1x1(tensor: torch.Tensor) -> torch.Tensor:
    # Some trainers store linear LoRAs as 1x1 convolution kernels (out, in, 1, 1).
    while tensor.ndim > 2 and tensor.shape[-1] == 1:
        tensor = tensor.squeeze(-1)
    return tensor


# How many dimensions each part has once 1x1 kernels are squeezed (lokr_w1/w2 are whole Kronecker factors).
_PART_DIMS = {"down": 2, "up": 2, "hada_w1_a": 2, "hada_w1_b": 2, "hada_w2_a": 2, "hada_w2_b": 2, "lokr_w1": 2,
              "lokr_w1_a": 2, "lokr_w1_b": 2, "lokr_w2": 2, "lokr_w2_a": 2, "lokr_w2_b": 2, "diff_b": 1}


def _file_alpha(entry: LayerEntry) -> float | None:
    """The layer's alpha from the file: one positive finite number (the tensors were checked finite on read)."""
    if "alpha" not in entry.parts:
        return None
    tensor = entry.parts["alpha"]
    name = entry.names[list(entry.parts).index("alpha")]
    if tensor.numel() != 1 or tensor.dtype == torch.bool or tensor.is_complex():
        raise LoRAError(f"{name}: the alpha is {tensor.dtype} {list(tensor.shape)}; an alpha is one number")
    alpha = float(tensor.double().item())
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoRAError(f"{name}: the alpha is {alpha}; it scales the layer's LoRA by alpha / rank and must be a "
                        "positive finite number")
    return alpha


def _check_parts(entry: LayerEntry) -> None:
    """Each matrix of the layer is a float tensor of the dimensions its part has (errors name the tensor)."""
    for (part, tensor), name in zip(entry.parts.items(), entry.names):
        if part == "alpha":
            continue
        if not tensor.is_floating_point():
            raise LoRAError(f"{name}: {tensor.dtype} where a LoRA holds float weights")
        dims = _PART_DIMS.get(part)
        shape = _squeeze_1x1(tensor).shape if dims == 2 else tensor.shape
        if dims is not None and len(shape) != dims:
            raise LoRAError(f"{name}: shape {list(tensor.shape)}; a {part} tensor has {dims} dimension"
                            f"{'s' if dims > 1 else ''}")
        if dims is not None and 0 in shape:
            raise LoRAError(f"{name}: shape {list(tensor.shape)} is empty")


def build_updates(entry: LayerEntry, peft_config: dict | None = None) -> list[Update]:
    """The updates one layer entry describes (empty when it holds only an alpha); errors name the keys."""
    parts = entry.parts
    alpha = _file_alpha(entry)
    _check_parts(entry)
    shown = ", ".join(entry.names)
    if "dora_scale" in parts:
        raise LoRAError(
            f"{shown}: DoRA (dora_scale) is not supported: its weight-norm rescaling cannot be added beside the "
            "layer; merge it into the model with the tool that trained it"
        )
    tucker = [p for p in ("hada_t1", "hada_t2", "lokr_t2") if p in parts]
    if tucker:
        raise LoRAError(f"{shown}: Tucker-decomposed factors ({', '.join(tucker)}) are for convolutions, which "
                        "Qwen-Image does not have; this file is not for this model")
    updates: list[Update] = []
    if "down" in parts or "up" in parts:
        if "down" not in parts or "up" not in parts:
            missing = "lora_A/lora_down" if "down" not in parts else "lora_B/lora_up"
            raise LoRAError(f"{shown}: the layer has half a LoRA pair; its {missing} tensor is missing")
        down, up = _squeeze_1x1(parts["down"]), _squeeze_1x1(parts["up"])
        if alpha is None:
            alpha = _alpha_from_config(peft_config, entry.key, down.shape[0])
        updates.append(LowRank(down, up, alpha))
    hada = [p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if p in parts]
    if hada:
        if len(hada) < 4:
            raise LoRAError(f"{shown}: a LoHa layer needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b")
        updates.append(LoHa(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"], alpha))
    lokr = {p[len("lokr_"):]: parts[p] for p in parts if p.startswith("lokr_")}
    if lokr:
        for factor in ("w1", "w2"):
            if factor not in lokr and not (f"{factor}_a" in lokr and f"{factor}_b" in lokr):
                raise LoRAError(
                    f"{shown}: a LoKr layer needs lokr_{factor} or both lokr_{factor}_a and lokr_{factor}_b"
                )
        updates.append(LoKr(**lokr, alpha=alpha))
    if "diff" in parts or "diff_b" in parts:
        updates.append(Dense(parts.get("diff"), parts.get("diff_b")))
    return updates
