"""Which module a LoRA layer key means: prefixes peeled, kohya underscores matched against the real module names.

A layer key is peeled of the wrappers trainers and tools add, and those wrappers also say which model it is for:

  DiT            `transformer.` (diffusers), `diffusion_model.` / `model.diffusion_model.` (ComfyUI),
                 `lora_unet_` / `lycoris_` + underscores (kohya, musubi-tuner, SimpleTuner's LyCORIS)
  text encoder   `text_encoder.`, `text_encoders.qwen25_7b.transformer.` (ComfyUI),
                 `lora_te_` / `lora_te1_` + underscores (kohya)
  either         `base_model.model.` (a raw PEFT save)

What is left is looked up among the module names of each target model. Kohya's underscore names cannot be split
back into dots by rule (`to_add_out` vs `to.add.out`), so every module name is flattened the same way and matched
whole. The text encoder answers to its current transformers names (`model.language_model.layers.0...`), the
released checkpoint's names (`model.layers.0...`, `visual.blocks.0...`) and the bare ones (`layers.0...`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from ..models.text_encoder import QwenImageTextEncoder

DIT, TEXT_ENCODER, ANY = "dit", "text_encoder", "any"

_EITHER_PREFIXES = ("base_model.model.",)
_MARKED_PREFIXES = (
    ("text_encoders.qwen25_7b.transformer.", TEXT_ENCODER, False),
    ("text_encoder.", TEXT_ENCODER, False),
    ("lora_te1_", TEXT_ENCODER, True),
    ("lora_te_", TEXT_ENCODER, True),
    ("model.diffusion_model.", DIT, False),
    ("diffusion_model.", DIT, False),
    ("transformer.", DIT, False),
    ("pipe.dit.", DIT, False),
    ("lora_unet_", DIT, True),
    ("lycoris_", DIT, True),
)
_LANGUAGE, _VISUAL = "model.language_model.", "model.visual."


@dataclass
class Target:
    """One model LoRA layers can land in, with every name each of its modules answers to."""

    kind: str  # DIT for the main module (whatever it is), TEXT_ENCODER for Qwen2.5-VL
    label: str  # for messages
    root: nn.Module
    dotted: dict[str, str] = field(default_factory=dict)  # alias -> module name
    flat: dict[str, str | None] = field(default_factory=dict)  # underscored alias -> module name (None: ambiguous)


def text_encoder_aliases(name: str) -> list[str]:
    """The names a text-encoder module goes by in LoRA files, ours (transformers 5) first."""
    aliases = [name]
    if name.startswith(_LANGUAGE):
        rest = name[len(_LANGUAGE):]
        aliases += ["model." + rest, "language_model." + rest, rest]
    elif name.startswith(_VISUAL):
        rest = name[len(_VISUAL):]
        aliases += ["visual." + rest]
    return aliases


def legacy_text_encoder_name(name: str) -> str:
    """The released checkpoint's (transformers 4) name of a text-encoder module, as other tools use it."""
    return text_encoder_aliases(name)[1] if name.startswith((_LANGUAGE, _VISUAL)) else name


def make_target(root: nn.Module, kind: str | None = None, label: str | None = None) -> Target:
    if kind is None:
        kind = TEXT_ENCODER if isinstance(root, QwenImageTextEncoder) else DIT
    target = Target(kind, label or ("text encoder" if kind == TEXT_ENCODER else type(root).__name__), root)
    for name, _ in root.named_modules():
        if not name:
            continue
        aliases = text_encoder_aliases(name) if kind == TEXT_ENCODER else [name]
        for alias in aliases:
            target.dotted.setdefault(alias, name)
            flat = alias.replace(".", "_")
            if target.flat.get(flat, name) != name:
                target.flat[flat] = None  # two modules flatten alike: refuse to guess
            else:
                target.flat[flat] = name
    return target


def peel(key: str) -> tuple[str, str, bool]:
    """(the bare layer name, which model the prefixes say it is for, whether it is a kohya underscore name)."""
    model, flat = ANY, False
    for prefix in _EITHER_PREFIXES:
        key = key.removeprefix(prefix)
    for prefix, marked, underscored in _MARKED_PREFIXES:
        if key.startswith(prefix):
            key, model, flat = key[len(prefix):], marked, underscored
            break
    for prefix in _EITHER_PREFIXES:
        key = key.removeprefix(prefix)
    return key, model, flat


def resolve(key: str, targets: list[Target]) -> tuple[Target, str] | None:
    """The (target, module name) a file's layer key means, or None when no module answers to it."""
    bare, model, flat = peel(key)
    for target in targets:
        if model != ANY and target.kind != model:
            continue
        if not flat and bare in target.dotted:
            return target, target.dotted[bare]
        found = target.flat.get(bare.replace(".", "_"))
        if found is not None:
            return target, found
    return None


def looks_like_text_encoder(key: str) -> bool:
    """A key that, by its prefix or its shape, is for a language model (for the hint when none is given)."""
    bare, model, _ = peel(key)
    return model == TEXT_ENCODER or "layers." in bare or "layers_" in bare or bare.startswith(("visual", "model."))
