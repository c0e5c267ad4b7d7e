"""Qwen-Image 2.1's conditioning: prompts and condition images -> the DiT's prefix (text states + layout + tokens).

Design note. The text encoder (Qwen3-VL) reads one chat turn: the system instruction, then, for editing, each
condition image as "<imageK><|vision_start|><|image_pad|>...<|vision_end|>", then the prompt. Its states after the
system turn are the DiT's text; the vision slots (one per 32x32 pixels) are where the DiT puts that image's latent
tokens (one per 16x16 pixels, so four per slot), which is why a condition image must reach the encoder and the VAE
at the same size, a multiple of 32: `condition_size` picks it, and `encode_prompt` checks that the processor kept it.
As in both references, the encoder sees an RGBA image composited over white, the VAE all four channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..models.layout21 import ImageBlock
from ..models.text_encoder21 import QwenImage21TextEncoder
from ..validation import InputError

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
SYSTEM_TURN = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"  # dropped from the states
_VISION = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_TOKEN = "<|image_pad|>"
MULTIPLE = 32  # one vision token per 32x32 pixels; one latent token per 16x16
LATENT_FACTOR = 16


def prompt_text(prompt: str, num_images: int) -> str:
    """The chat turn the encoder reads. An empty prompt becomes one space (Qwen has no BOS token to read)."""
    images = " ".join(f"<image{k}>{_VISION}" for k in range(1, num_images + 1))
    return f"{SYSTEM_TURN}<|im_start|>user\n{images}{prompt or ' '}<|im_end|>\n<|im_start|>assistant\n"


def area_size(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about `area` pixels at aspect `ratio` (width / height), each rounded to a multiple of 32."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / MULTIPLE) * MULTIPLE, round(height / MULTIPLE) * MULTIPLE


def output_size(height: int | None, width: int | None, images: list[Image.Image], resolution: int) -> tuple[int, int]:
    """(height, width): as given, else the last condition image's aspect at resolution^2 pixels, else resolution
    square; then floored to multiples of 32 (the reference's rule)."""
    if images:
        auto_width, auto_height = area_size(resolution * resolution, images[-1].width / images[-1].height)
        height, width = height or auto_height, width or auto_width
    height, width = height or resolution, width or resolution
    return height // MULTIPLE * MULTIPLE, width // MULTIPLE * MULTIPLE


def condition_size(image: Image.Image, resolution: int) -> tuple[int, int]:
    """(width, height) a condition image is resized to: its aspect at resolution^2 pixels, multiples of 32."""
    return area_size(resolution * resolution, image.width / image.height)


def prepare_condition(image: Image.Image, resolution: int) -> Image.Image:
    """An RGBA copy at its condition size (Lanczos, as the reference resizes)."""
    return image.convert("RGBA").resize(condition_size(image, resolution), resample=Image.LANCZOS)


def over_white(image: Image.Image) -> Image.Image:
    """What the vision encoder was trained on: the alpha composited over white."""
    canvas = Image.new("RGB", image.size, (255, 255, 255))
    canvas.paste(image, mask=image.getchannel("A"))
    return canvas


def rgba_tensor(image: Image.Image, device, dtype) -> torch.Tensor:
    """RGBA PIL -> (1, 4, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0)
    return (array.permute(2, 0, 1)[None] * 2 - 1).to(device=device, dtype=dtype)


def latent_block(image: Image.Image) -> ImageBlock:
    return ImageBlock(image.height // LATENT_FACTOR, image.width // LATENT_FACTOR)


@dataclass
class PromptPrefix:
    """One prompt's part of the DiT prefix: its text states (1, L, D) and the prefix runs (text lengths and the
    condition images' blocks, in sequence order)."""

    text_states: torch.Tensor
    runs: tuple[int | ImageBlock, ...]


def system_turn_length(tokenizer) -> int:
    return len(tokenizer(SYSTEM_TURN, add_special_tokens=False)["input_ids"])


def _resized_by_processor(block: ImageBlock) -> InputError:
    return InputError(f"a condition image of {block.width * LATENT_FACTOR}x{block.height * LATENT_FACTOR} pixels did "
                      "not keep its size in the processor (its vision tokens do not match its latent grid): the "
                      "processor's min/max pixels must admit that size; change output_resolution or the processor")


def _runs(is_slot: torch.Tensor, blocks: list[ImageBlock]) -> tuple[int | ImageBlock, ...]:
    """The prefix runs of one row from its vision-slot flags: text runs between the images' slot runs."""
    runs, position, flags = [], 0, is_slot.tolist()
    for block in blocks:
        start = flags.index(True, position) if True in flags[position:] else len(flags)
        if start > position:
            runs.append(start - position)
        slots = block.num_tokens // 4
        if flags[start:start + slots] != [True] * slots:
            raise _resized_by_processor(block)
        runs.append(block)
        position = start + slots
    if position < len(flags):
        runs.append(len(flags) - position)
    return tuple(runs)


def encode_prompt(text_encoder: QwenImage21TextEncoder, processor, prompts: list[str], images: list[Image.Image],
                  device, dtype) -> list[PromptPrefix]:
    """Each prompt read with all condition images (RGBA, at their condition size); one encoder batch, left-padded
    as the reference pads it."""
    texts = [prompt_text(p, len(images)) for p in prompts]
    vision = [over_white(image) for image in images] * len(prompts)
    inputs = processor(text=texts, images=vision or None, padding=True, padding_side="left", return_tensors="pt")
    blocks = [latent_block(image) for image in images]
    for block, grid in zip(blocks, inputs["image_grid_thw"].tolist() if images else []):
        if grid[1:] != [block.height, block.width]:  # 16-pixel patches: the latent grid, when the size was kept
            raise _resized_by_processor(block)
    kwargs = {k: inputs[k].to(device) for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if k in inputs}
    if "pixel_values" in kwargs:
        kwargs["pixel_values"] = kwargs["pixel_values"].to(dtype)
    input_ids, attention_mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    with torch.no_grad():
        hidden = text_encoder(input_ids, attention_mask, **kwargs)  # (B, S, D)
    drop = system_turn_length(processor.tokenizer)
    image_token = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    prefixes = []
    for row in range(hidden.shape[0]):
        valid = attention_mask[row].bool()
        states, is_slot = hidden[row][valid][drop:], (input_ids[row][valid][drop:] == image_token)
        prefixes.append(PromptPrefix(states[~is_slot][None].to(dtype), _runs(is_slot, blocks)))
    return prefixes
