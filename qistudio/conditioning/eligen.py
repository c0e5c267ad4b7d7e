"""EliGen: entity-level control. Each entity is a prompt and a region; its text only talks to its region.

Design note. The text stream of a row becomes [entity_1 | ... | entity_N | global prompt], each entity prompt
encoded on its own with the text-to-image template, and every segment's RoPE positions restart at the same offset
(as DiffSynth-Studio, whose EliGen LoRAs were trained so). A boolean mask over the joint sequence [image, text]
then says who may attend to whom: image tokens see each other; an entity's text and the image tokens of its
region see each other (both directions); the global prompt and all image tokens see each other; text segments do
not see one another; padding is seen by nobody. An image token belongs to a region when any of its 2x2 latent
pixels is inside the mask (masks are resized to the latent grid with nearest-neighbour; white = entity).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .. import imageio
from ..models.text_encoder import TextStates
from ..validation import InputError, shown

MAX_ENTITIES = 16  # each entity adds its text to every attention call; more than this is not a layout, it is noise


@dataclass
class EntityControl:
    """The caller's entities, checked: prompts, binary token masks on the target's patch grid, negative flag."""

    prompts: list[str]
    token_masks: torch.Tensor  # (N, h*w) bool, h x w = the target's patch grid
    on_negative: bool = False


def mask_to_tokens(mask: Image.Image, latent_height: int, latent_width: int) -> torch.Tensor:
    """(h/2 * w/2,) bool: which patch tokens the white part of `mask` covers."""
    small = mask.convert("RGB").resize((latent_width, latent_height), Image.NEAREST)
    pixels = torch.from_numpy(np.asarray(small, dtype=np.float32)) / 127.5 - 1  # (h, w, 3) in [-1, 1]
    inside = pixels.mean(dim=-1) > 0  # (h, w)
    patches = inside.reshape(latent_height // 2, 2, latent_width // 2, 2).any(dim=3).any(dim=1)
    return patches.reshape(-1)


def load_mask(mask, name: str | None = None) -> Image.Image:
    """A mask (PIL image or path) as RGB, any alpha channel dropped rather than flattened on white.

    DiffSynth-Studio's EliGen examples read masks with `.convert("RGB")` (and its unit, given RGBA, averages the
    alpha in): a white entity on a transparent black background stays white on black. Flattening on white, right
    for pictures (imageio.load_image), would turn that whole mask white: the entity would cover the image.
    """
    return imageio.load_mask(mask, name)


def entity_control(prompts, masks, on_negative: bool, latent_height: int, latent_width: int) -> EntityControl:
    """Check the caller's entity prompts and masks (before any model runs) and turn masks into token masks."""
    for name, value in (("eligen_entity_prompts", prompts), ("eligen_entity_masks", masks)):
        if value is not None and not isinstance(value, (list, tuple)):
            raise InputError(f"{name} must be a list (one entry per entity), got {shown(value)}")
    prompts, masks = list(prompts or []), list(masks or [])
    if len(prompts) != len(masks):
        raise InputError(f"eligen_entity_prompts has {len(prompts)} prompts but eligen_entity_masks has "
                         f"{len(masks)} masks; give one mask per entity prompt")
    if not prompts:
        raise InputError("eligen_entity_prompts is empty; give at least one entity or leave both unset")
    if len(prompts) > MAX_ENTITIES:
        raise InputError(f"eligen_entity_prompts has {len(prompts)} entities; at most {MAX_ENTITIES} are supported")
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InputError(f"eligen_entity_prompts: every entity prompt must be a non-empty string, got {shown(prompts)}")
    token_masks = []
    for k, mask in enumerate(masks):
        tokens = mask_to_tokens(load_mask(mask, f"eligen_entity_masks[{k}]"), latent_height, latent_width)
        if not tokens.any():
            raise InputError(f"eligen_entity_masks: entity mask {k} ({prompts[k]!r}) is empty at this size: it "
                             "covers no image token (white marks the entity's region)")
        token_masks.append(tokens)
    return EntityControl(prompts, torch.stack(token_masks), on_negative)


def entity_text(entities: TextStates, global_states: TextStates) -> TextStates:
    """Per row, [entity_1 ... entity_N, global] states packed without gaps; `segments` holds their lengths.

    entities: (N, L_e, D) states of the entity prompts (shared by every row); global_states: (B, L_g, D).
    """
    rows, segments = [], []
    entity_rows = [entities.states[k, :n] for k, n in enumerate(entities.lengths)]
    for i, n in enumerate(global_states.lengths):
        parts = entity_rows + [global_states.states[i, :n]]
        rows.append(torch.cat(parts))
        segments.append([p.shape[0] for p in parts])
    width = max(r.shape[0] for r in rows)
    states = global_states.states.new_zeros(len(rows), width, global_states.states.shape[-1])
    for i, row in enumerate(rows):
        states[i, : row.shape[0]] = row
    return TextStates(states, [r.shape[0] for r in rows], segments)


def entity_mask_parts(num_image: int, num_target: int, text_length: int, segments: list[int],
                      token_masks: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For one row: (L, num_image) text<->image and (L, L) text<->text booleans, True = may attend.

    segments: the row's text segment lengths, [entities..., global] (a plain row: [its length]).
    token_masks: (N, num_target) for the entity segments; the global segment sees every image token.
    Image tokens always see each other (ops.split_attention.SplitMask); padding sees and is seen by nobody.
    """
    text_to_image = torch.zeros(text_length, num_image, dtype=torch.bool, device=device)
    text_to_text = torch.zeros(text_length, text_length, dtype=torch.bool, device=device)
    start = 0
    for k, length in enumerate(segments):
        end = start + length
        text_to_text[start:end, start:end] = True
        if k < len(segments) - 1:  # an entity: its region of the target only
            text_to_image[start:end, :num_target] = token_masks[k].to(device)
        else:  # the global prompt: every image token
            text_to_image[start:end] = True
        start = end
    return text_to_image, text_to_text
