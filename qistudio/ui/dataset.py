"""A training dataset folder as the Train tab shows it: its images and their captions (metadata.csv), edited and
saved back.

The folder layout is the one `qistudio train --dataset_base_path DIR --dataset_metadata_path DIR/metadata.csv`
reads: a CSV with the columns image (a path relative to the folder) and prompt. A folder of images without one
gets a table with every image and an empty caption, to fill in and save.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from PIL import Image

from ..fileio import write_text_atomic
from ..validation import InputError

METADATA = "metadata.csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
THUMBNAIL = 160


def _folder(path) -> Path:
    folder = Path(str(path or "")).expanduser()
    if not str(path or "").strip() or not folder.is_dir():
        raise InputError(f"dataset folder {str(path or '')!r}: no such folder")
    return folder.resolve()


def read_captions(path) -> list[list[str]]:
    """[[image, prompt], ...] from the folder's metadata.csv, else its images with empty prompts."""
    folder = _folder(path)
    metadata = folder / METADATA
    if metadata.is_file():
        with open(metadata, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "prompt"} <= set(reader.fieldnames):
                raise InputError(f"{metadata}: needs the columns image and prompt, has {reader.fieldnames}")
            return [[row["image"], row["prompt"]] for row in reader]
    images = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(f"{folder} has no {METADATA} and no images ({', '.join(IMAGE_SUFFIXES)})")
    return [[name, ""] for name in images]


def write_captions(path, rows) -> Path:
    """Write [[image, prompt], ...] as the folder's metadata.csv (atomically); every image must exist there."""
    folder = _folder(path)
    clean = []
    for k, row in enumerate(rows or []):
        image, prompt = (str(v) if v is not None else "" for v in (list(row) + ["", ""])[:2])
        if not image.strip():
            continue
        if not (folder / image).is_file():
            raise InputError(f"captions row {k + 1}: {image!r} is not a file in {folder}")
        if not prompt.strip():
            raise InputError(f"captions row {k + 1}: {image!r} has no caption")
        clean.append([image, prompt])
    if not clean:
        raise InputError("the captions table is empty")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "prompt"])
    writer.writerows(clean)
    return write_text_atomic(folder / METADATA, out.getvalue())


def thumbnails(path, rows, limit: int = 48) -> list[tuple[Image.Image, str]]:
    """Small pictures of the first `limit` images of the table, captioned, for a gallery."""
    folder = _folder(path)
    out = []
    for image, prompt in (list(row)[:2] for row in (rows or [])[:limit]):
        try:
            with Image.open(folder / str(image)) as picture:
                picture.thumbnail((THUMBNAIL, THUMBNAIL))
                out.append((picture.convert("RGB"), f"{image}: {prompt}"))
        except (OSError, ValueError):
            continue
    return out
