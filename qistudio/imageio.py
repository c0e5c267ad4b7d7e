"""PIL <-> tensors, valid sizes, and PNGs that carry the parameters that made them."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .fileio import atomic_open

PNG_KEY = "qistudio"


def round_size(height: int, width: int, multiple: int = 16) -> tuple[int, int]:
    """Round a size up to a multiple (the DiT patchifies 8x-downsampled latents 2x2), warning when it changes."""
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    h, w = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    if (h, w) != (height, width):
        warnings.warn(f"size {width}x{height} is not a multiple of {multiple}; using {w}x{h}", stacklevel=3)
    return h, w


def load_image(image) -> Image.Image:
    """A PIL image from a PIL image or a path; RGBA is flattened on white. Clear errors for unreadable input."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                image = f.copy()
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {str(image)!r}: {e}") from None
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or a path, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has zero size ({image.width}x{image.height})")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # The models were trained on opaque RGB; white is what a viewer shows behind a transparent PNG.
        warnings.warn("image has an alpha channel; it is flattened on white", stacklevel=2)
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def image_to_tensor(image: Image.Image, device=None, dtype=torch.float32) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
    return (array.permute(2, 0, 1)[None] / 127.5 - 1).to(device=device, dtype=dtype)


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images (clamped, rounded)."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def save_png(image: Image.Image, path: str | Path, parameters: dict) -> Path:
    """Write a PNG with `parameters` as JSON in its text chunk, atomically (temporary file, then rename)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(parameters, ensure_ascii=False))
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG", pnginfo=info)
    return path


def read_png_parameters(path: str | Path) -> dict:
    with Image.open(path) as image:
        text = image.text.get(PNG_KEY) if hasattr(image, "text") else None
    if text is None:
        raise ValueError(f"{path} carries no qistudio generation parameters")
    return json.loads(text)
