"""Qwen-Image 2.1 training samples: an image, its prompt and up to ten edit images -> what the 2.1 DiT reads.

Design note. Everything the DiT reads is inference's own (conditioning/qwen21.py, pipeline21.py): the prompt read by
Qwen3-VL with each edit image in its vision slots, the system turn dropped, the edit images' RGBA latents standing in
those slots in the prefix, the target (the training image, RGBA: a picture without alpha is opaque) last. Edit
images are sized as DiffSynth-Studio's 2.1 trainer sizes them, each its own aspect at the target's area in multiples
of 32; at inference's default (target and edit images both at output_resolution^2) that is the same rule.

No prefix KV cache in training: a step makes one DiT call, so the prefix (text and edit tokens, through the trained
weights too) is computed in that call with gradients, in the DiT's `joint` pass: each block runs once over the prefix
and the target (so FSDP2's per-block gradient reductions come in block order whatever the prefix), with the numbers
of `prefill` then the target pass, themselves the reference's single joint pass (models/dit21.py's note), only the
target's rows of which reach the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..components import Components
from ..conditioning.qwen21 import area_size, encode_prompt, rgba_tensor
from ..models.layout21 import ImageBlock, JointLayout
from ..pipeline21 import processor21
from ..request21 import MAX_EDIT_IMAGES

EDIT_KEY = "edit_image"


@dataclass
class Qwen21Sample:
    latents: torch.Tensor  # (1, C, h, w) the training image's latents: x0
    text_states: torch.Tensor  # (1, L, text_dim): the prompt's states, vision slots left out
    runs: tuple  # the prefix runs: text lengths and the edit images' ImageBlocks, in sequence order
    condition: torch.Tensor | None = None  # (1, N, C) the edit images' latent tokens, image after image

    @property
    def num_target_tokens(self) -> int:
        return self.latents.shape[-2] * self.latents.shape[-1]

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, C, h, w) -> (1, h w, C): the 2.1 DiT reads latents unpatched, row-major."""
        return latents.flatten(2).transpose(1, 2)

    def velocity(self, dit, tokens: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Prefix and target through each block at once, with gradients: tokens (B, h w, C) -> velocity (B, h w, C)."""
        layout = JointLayout(tuple(self.runs), ImageBlock(*self.latents.shape[-2:]))
        return dit.joint(self.text_states, self.condition, layout, tokens, timestep)


def edit_images(sample: dict) -> list[Image.Image]:
    edits = sample.get(EDIT_KEY)
    return [] if edits in (None, "", []) else edits if isinstance(edits, list) else [edits]


def check_qwen21_row(sample: dict) -> None:
    """A loaded row's ValueError (the dataset skips such a row, naming why)."""
    if isinstance(sample.get("image"), list):
        raise ValueError("Qwen-Image 2.1's image is one file (the training target), not a list")
    count = len(edit_images(sample))
    if count > MAX_EDIT_IMAGES:
        raise ValueError(f"Qwen-Image 2.1 edits with 1 to {MAX_EDIT_IMAGES} images; this row has {count}")


def sized_edit_images(sample: dict) -> list[Image.Image]:
    """The edit images in RGBA, each at its aspect and the target's area (multiples of 32, Lanczos)."""
    area = sample["image"].width * sample["image"].height
    return [image.convert("RGBA").resize(area_size(area, image.width / image.height), resample=Image.LANCZOS)
            for image in edit_images(sample)]


def encode_qwen21(components: Components, sample: dict, device, dtype: torch.dtype) -> Qwen21Sample:
    """Encode one loaded row with the frozen Qwen3-VL encoder and the 2.1 VAE (no gradients)."""
    components.require("dit", "vae", "text_encoder")
    processor = processor21(components)
    edits = sized_edit_images(sample)
    vae = components.vae
    vae_dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        latents = vae.encode(rgba_tensor(sample["image"], device, vae_dtype)).to(dtype)
        prefix = encode_prompt(components.text_encoder, processor, [sample["prompt"]], edits, device, dtype)[0]
        condition = None
        if edits:
            blocks = [vae.encode(rgba_tensor(image, device, vae_dtype)) for image in edits]
            condition = torch.cat([block.flatten(2).transpose(1, 2) for block in blocks], dim=1).to(dtype)
    return Qwen21Sample(latents, prefix.text_states, tuple(prefix.runs), condition)
