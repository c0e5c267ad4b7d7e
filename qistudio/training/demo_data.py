"""The mini dataset `qistudio train --demo` trains on: a few drawn shapes with captions, laid out as a real dataset.

The folder holds `metadata.csv` (columns image, prompt) and the PNGs it names: the layout `--dataset_base_path` and
`--dataset_metadata_path` expect, so it doubles as an example to copy. It is written to a temporary folder beside
the target and renamed into place; an existing complete one (its metadata.csv is written last) is reused.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from ..fileio import current_umask

METADATA = "metadata.csv"
SIZE = 64  # pixels a side: 8x8 latents, 16 image tokens in the demo DiT
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70), "yellow": (235, 200, 30)}
SAMPLES = (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"), ("red", "square"),
           ("blue", "triangle"), ("green", "circle"), ("yellow", "square"))


def draw(colour: str, shape: str, size: int = SIZE) -> Image.Image:
    """One picture: a coloured shape on white."""
    image = Image.new("RGB", (size, size), (250, 250, 245))
    pen = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image


def write_demo_dataset(folder: str | Path) -> Path:
    """The dataset at `folder` (made if absent or incomplete); returns its metadata file."""
    folder = Path(folder).absolute()
    if (folder / METADATA).is_file():
        return folder / METADATA
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not a demo dataset (it has no {METADATA}); move it away")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        rows = []
        for k, (colour, shape) in enumerate(SAMPLES):
            name = f"{k:02d}_{colour}_{shape}.png"
            draw(colour, shape).save(staging / name)
            rows.append({"image": name, "prompt": f"a {colour} {shape} on a white background"})
        with open(staging / METADATA, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "prompt"])
            writer.writeheader()
            writer.writerows(rows)
        staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide an example meant to be read
        if folder.exists():
            folder.rmdir()  # empty (checked above)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / METADATA

