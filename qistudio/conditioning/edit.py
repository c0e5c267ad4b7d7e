"""Edit images -> the two things the Edit models read: vision tokens in the prompt, and VAE latents.

Design note. Qwen-Image-Edit sees each edit image twice. The text encoder (Qwen2.5-VL) reads it as vision tokens
inside the Edit template, so the instruction is understood against the picture; the DiT reads its VAE latents,
appended after the target tokens with their own RoPE frame, so details can be copied across. Two templates exist:
the original Edit model's (one image, `<|vision_start|><|image_pad|><|vision_end|>` before the instruction) and
Edit-2509/2511's ("Picture k: ..." per image), chosen as the seed does: a bare image uses the first, a list the
second. The vision copy of a listed image is small (about 384x384) because the text encoder only needs its gist;
the latent copy is about 1024x1024, the area the Edit models were trained at. Resizing uses Lanczos (diffusers'
choice; it keeps edges crisp when shrinking photos).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from PIL import Image

from ..models.text_encoder import EDIT_TEMPLATE, QwenImageTextEncoder, TextStates, template_prefix_length
from ..validation import InputError
from .prompt import trim_template

# Both areas are the Edit models' training conditions; module constants so that tests can shrink them.
EDIT_LATENT_AREA = 1024 * 1024
EDIT_VISION_AREA = 384 * 384
# Edit-2509/2511 were trained with one to three input images; more still run, with a warning.
TRAINED_MAX_EDIT_IMAGES = 3

EDIT_MULTI_TEMPLATE = EDIT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>{}", "{}")
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def size_at_area(area: int, aspect: float, multiple: int = 32) -> tuple[int, int]:
    """(width, height) of about `area` pixels with the given width/height aspect, sides multiples of `multiple`."""
    width = math.sqrt(area * aspect)
    height = width / aspect
    return max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple)


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


@dataclass
class EditRow:
    """The edit images of one prompt, as given, and whether they use the multi-image ("Picture k") template."""

    images: list[Image.Image]
    multi: bool

    @property
    def aspect(self) -> float:
        # The output follows the last image: with several images, the last is the one being edited
        # ("... based on picture 1 and 2, edit picture 3"), as in diffusers.
        width, height = self.images[-1].size
        return width / height

    def vision_images(self, auto_resize: bool) -> list[Image.Image]:
        """The copies the text encoder sees."""
        if self.multi:
            return [_resized(im, *size_at_area(EDIT_VISION_AREA, im.width / im.height)) for im in self.images]
        # The original Edit model sees the same picture as its latents.
        return self.latent_images(auto_resize)

    def latent_images(self, auto_resize: bool) -> list[Image.Image]:
        """The copies the VAE encodes: about 1024x1024 (auto_resize), else the given size rounded to 16."""
        out = []
        for im in self.images:
            if auto_resize:
                size = size_at_area(EDIT_LATENT_AREA, im.width / im.height)
            else:
                # The DiT needs even latent sides; round rather than crop, so nothing leaves the frame.
                size = (max(16, round(im.width / 16) * 16), max(16, round(im.height / 16) * 16))
                if size != im.size:
                    warnings.warn(f"edit image {im.width}x{im.height} is resized to {size[0]}x{size[1]} "
                                  "(sides must be multiples of 16)", stacklevel=4)
            out.append(_resized(im, *size))
        return out

    def prompt_text(self, prompt: str) -> str:
        if self.multi:
            return EDIT_MULTI_TEMPLATE.format("".join(PICTURE.format(k + 1) for k in range(len(self.images))) + prompt)
        return EDIT_TEMPLATE.format(prompt)


def output_size_for_edit(rows: list[EditRow]) -> tuple[int, int]:
    """(height, width) of the output when the caller gives none: the edit image's aspect at the working area.

    At that size the output grid equals the (auto-resized) edit image's latent grid, so a region the
    instruction leaves alone lands on the same pixels instead of shifting or zooming.
    """
    sizes = {size_at_area(EDIT_LATENT_AREA, row.aspect) for row in rows}
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
        raise InputError(f"the edit images of this batch give different output sizes ({listed}); one call makes "
                         "one size: pass height= and width=, or edit them in separate calls")
    width, height = sizes.pop()
    return height, width


def encode_edit_prompts(
    text_encoder: QwenImageTextEncoder,
    processor,
    prompts: list[str],
    rows: list[EditRow],
    auto_resize: bool,
    device,
    dtype: torch.dtype,
) -> TextStates:
    """(B, L, D) states of each prompt read together with its row's edit images (template prefix dropped)."""
    texts = [row.prompt_text(p) for p, row in zip(prompts, rows)]
    images = [im for row in rows for im in row.vision_images(auto_resize)]  # the processor fills slots in order
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    drop = template_prefix_length(processor.tokenizer, EDIT_TEMPLATE)
    attention_mask = inputs["attention_mask"].to(device)
    with torch.no_grad():
        hidden = text_encoder(
            inputs["input_ids"].to(device),
            attention_mask,
            pixel_values=inputs["pixel_values"].to(device),
            image_grid_thw=inputs["image_grid_thw"].to(device),
        )
    return trim_template(hidden, attention_mask, drop, dtype)

