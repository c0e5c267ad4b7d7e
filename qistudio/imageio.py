"""Images in and out: reading as users mean them, PIL <-> tensors, valid sizes, PNGs that carry their parameters."""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from .fileio import atomic_open
from .validation import InputError, shown

PNG_KEY = "qistudio"


def round_size(height: int, width: int, multiple: int = 16) -> tuple[int, int]:
    """Round a size up to a multiple (the DiT patchifies 8x-downsampled latents 2x2), warning when it changes."""
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    h, w = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    if (h, w) != (height, width):
        warnings.warn(f"size {width}x{height} is not a multiple of {multiple}; using {w}x{h}", stacklevel=3)
    return h, w


def _open(path, name: str | None) -> Image.Image:
    """The file's image, loaded and upright; a too-large or unreadable file is one InputError naming it."""
    prefix = f"{name}: " if name else ""
    try:
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; either way the file is refused here, with its
        # size. (catch_warnings changes the process's filters for this block; nothing else warns in it.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as f:
                f.load()
                return _upright(f, name or str(path))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(
            f"{prefix}{str(path)!r} is too large to read safely ({e}); if you trust the file, raise "
            f"PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS})"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error) as e:
        # PIL's decoders raise any of these for a damaged or truncated file.
        raise InputError(f"{prefix}cannot read image {str(path)!r}: {e or type(e).__name__}") from None


def _upright(image: Image.Image, name: str) -> Image.Image:
    """The image as a viewer shows it: EXIF orientation applied (cameras store portraits sideways)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as e:  # a damaged EXIF block can fail in many ways; the pixels are still good
        warnings.warn(f"{name}: its EXIF orientation could not be read ({e}); used as stored", stacklevel=4)
        return image.copy()


def _eight_bit(image: Image.Image, name: str) -> Image.Image:
    """16-bit and float single-channel images ("I;16*", "I", "F") as 8-bit "L", scaled by their range.

    PIL's own convert clips them (65535 and 1.0 both become 255 or 1), which turns a 16-bit depth map white and a
    float one black. Integer images are read as 16-bit (0..65535, /257: 16-bit PNG, TIFF and PGM load as "I;16" or
    "I"); float images as 0..1 (a warning when values fall outside, which are clipped); NaN or infinity is an error.
    """
    if image.mode.startswith("I"):
        values = np.asarray(image).astype(np.float64)
        scaled = np.clip(values, 0, 65535) / 257.0
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise InputError(f"{name}: the float image has NaN or infinite pixels; give finite values in 0..1")
        if values.size and (values.min() < 0 or values.max() > 1):
            warnings.warn(f"{name}: float image values span [{values.min():g}, {values.max():g}]; they are read as "
                          "0..1 and clipped", stacklevel=4)
        scaled = np.clip(values, 0, 1) * 255.0
    else:
        return image
    return Image.fromarray(np.round(scaled).astype(np.uint8))  # 2-D uint8: mode "L"


def read_image(image, name: str | None = None) -> Image.Image:
    """A PIL image from a PIL image or a path: upright (EXIF), 8 bits per channel, alpha kept (straight).

    Every way this can fail is one InputError naming `name` (the argument, when given) and the file.
    """
    where = name or "image"
    if isinstance(image, (str, os.PathLike)):
        where = f"{name} {str(image)!r}" if name else repr(str(image))
        image = _open(image, name)
    elif isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise InputError(f"{where}: image has zero size ({image.width}x{image.height})")
        image = _upright(image, where)
    else:
        raise InputError(f"{where} must be a PIL image or a path, got {shown(image)}")
    if image.width == 0 or image.height == 0:
        raise InputError(f"{where}: image has zero size ({image.width}x{image.height})")
    image = _eight_bit(image, where)
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts these only to their straight form
        image = image.convert(image.mode.upper())
    return image


def _rgb(image: Image.Image, name: str) -> Image.Image:
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise InputError(f"{name}: an image of mode {image.mode} cannot be read as RGB ({e})") from None


def load_image(image, name: str | None = None) -> Image.Image:
    """An RGB picture from a PIL image or a path (see read_image); alpha is flattened on white."""
    image = read_image(image, name)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # The models were trained on opaque RGB; white is what a viewer shows behind a transparent PNG.
        warnings.warn(f"{name or 'image'} has an alpha channel; it is flattened on white", stacklevel=2)
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return _rgb(image, name or "image")


def load_mask(mask, name: str | None = None) -> Image.Image:
    """A mask as RGB, read like any image (see read_image), any alpha channel dropped rather than flattened.

    A white region on a transparent black background stays white on black; flattened on white, as pictures are,
    the whole mask would turn white.
    """
    return _rgb(read_image(mask, name), name or "mask")


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
