"""Output sizes the UI offers: Qwen-Image's published size for each aspect ratio, or the same ratios at a smaller
model's default area (the demo's 256x256), always multiples of 16."""

from __future__ import annotations

import math

# QwenLM/Qwen-Image README (quick start, `aspect_ratios`): the sizes the model was tuned for.
QWEN_IMAGE_SIZES = {
    "1:1": (1328, 1328), "16:9": (1664, 928), "9:16": (928, 1664), "4:3": (1472, 1104), "3:4": (1104, 1472),
    "3:2": (1584, 1056), "2:3": (1056, 1584),
}  # fmt: skip
FREE = "free size"
FOLLOW_INPUT = "input image's size"


def _round16(value: float) -> int:
    return max(16, int(round(value / 16)) * 16)


def presets(default_size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Label -> (width, height). At Qwen-Image's own area the published sizes; at another default area (a small
    model) the same aspect ratios scaled to that area."""
    area = default_size[0] * default_size[1]
    out = {}
    for ratio, (width, height) in QWEN_IMAGE_SIZES.items():
        if area != 1328 * 1328:
            scale = math.sqrt(area / (width * height))
            width, height = _round16(width * scale), _round16(height * scale)
        out[f"{ratio} ({width}x{height})"] = (width, height)
    return out


def chosen_size(choice: str, width, height, table: dict[str, tuple[int, int]]) -> tuple[int, int] | None:
    """(width, height) for the size dropdown's choice: a preset, the free size fields, or None (follow the input
    image)."""
    if choice in table:
        return table[choice]
    if choice == FOLLOW_INPUT:
        return None
    return int(width), int(height)


def at_area(size: tuple[int, int], area: int) -> tuple[int, int]:
    """`size`'s aspect ratio at about `area` pixels, multiples of 16."""
    scale = math.sqrt(area / (size[0] * size[1]))
    return _round16(size[0] * scale), _round16(size[1] * scale)


def rounded(width: int, height: int) -> tuple[int, int]:
    """An image's own size rounded up to multiples of 16, as `qistudio generate` sizes image-to-image."""
    return -(-width // 16) * 16, -(-height // 16) * 16
