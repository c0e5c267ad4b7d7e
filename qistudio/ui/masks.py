"""What was painted on a gr.ImageEditor: the background picture, an inpainting mask, and EliGen's regions by colour.

The editor's value (type="pil") is {"background": image, "layers": [RGBA images], "composite": image}. Strokes
live in the layers; a pixel counts as painted where a layer's alpha is at least half (the brush's soft rim, drawn
at lower alpha and blended colour, is left out, so a region is what the user filled and a colour is read exactly).
EliGen's canvas gives each entity a colour of PALETTE; a painted pixel belongs to the palette colour nearest to it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Entity colours (name, hex): distinct at a glance and far apart in RGB, so the nearest-colour rule is unambiguous.
PALETTE = (("red", "#e6194b"), ("green", "#3cb44b"), ("blue", "#4363d8"), ("orange", "#f58231"),
           ("purple", "#911eb4"), ("cyan", "#42d4f4"))


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def background(value) -> Image.Image | None:
    """The picture under the strokes, as RGB; None when the editor is empty."""
    if not value or value.get("background") is None:
        return None
    picture = value["background"]
    if "A" in picture.getbands():  # transparent parts read as white, as imageio.load_image reads them
        white = Image.new("RGBA", picture.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, picture.convert("RGBA")).convert("RGB")
    return picture.convert("RGB")


def _layers(value, size: tuple[int, int]) -> list[np.ndarray]:
    """The stroke layers as (H, W, 4) uint8 arrays at `size` (width, height)."""
    out = []
    for layer in (value or {}).get("layers") or []:
        if layer is None:
            continue
        layer = layer.convert("RGBA")
        if layer.size != size:
            layer = layer.resize(size, Image.NEAREST)
        out.append(np.asarray(layer))
    return out


def _canvas_size(value) -> tuple[int, int] | None:
    for key in ("background", "composite"):
        if value and value.get(key) is not None:
            return value[key].size
    layers = [layer for layer in (value or {}).get("layers") or [] if layer is not None]
    return layers[0].size if layers else None


def painted(value) -> np.ndarray | None:
    """(H, W) bool: where any layer was painted; None when the editor is empty."""
    size = _canvas_size(value)
    if size is None:
        return None
    covered = np.zeros((size[1], size[0]), dtype=bool)
    for layer in _layers(value, size):
        covered |= layer[..., 3] >= 128
    return covered


def mask_image(value) -> Image.Image | None:
    """The painted area as the pipeline's mask (white = repaint, RGB); None when nothing was painted."""
    covered = painted(value)
    if covered is None or not covered.any():
        return None
    return Image.fromarray(np.where(covered, 255, 0).astype(np.uint8)).convert("RGB")


def regions(value) -> dict[str, Image.Image]:
    """Colour name -> its painted region as a white-on-black RGB mask, for each PALETTE colour that was used."""
    size = _canvas_size(value)
    if size is None:
        return {}
    palette = np.array([_rgb(hex_colour) for _, hex_colour in PALETTE], dtype=np.int32)  # (C, 3)
    owner = np.full((size[1], size[0]), -1, dtype=np.int64)
    for layer in _layers(value, size):  # later layers paint over earlier ones, as the editor shows them
        solid = layer[..., 3] >= 128
        colours = layer[..., :3].astype(np.int32)[solid]  # (N, 3)
        distances = ((colours[:, None, :] - palette[None]) ** 2).sum(-1)  # (N, C)
        owner[solid] = distances.argmin(1)
    out = {}
    for index, (name, _) in enumerate(PALETTE):
        region = owner == index
        if region.any():
            out[name] = Image.fromarray(np.where(region, 255, 0).astype(np.uint8)).convert("RGB")
    return out


def blank_canvas(width: int, height: int) -> dict:
    """An editor value holding a white canvas of the output size (EliGen's regions are drawn on it)."""
    return {"background": Image.new("RGB", (width, height), (255, 255, 255)), "layers": [], "composite": None}


def with_background(image: Image.Image | None) -> dict | None:
    """An editor value holding `image` with no strokes (for "use as inpaint input")."""
    if image is None:
        return None
    return {"background": image, "layers": [], "composite": image}
