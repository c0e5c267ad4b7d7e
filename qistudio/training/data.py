"""Training samples: a metadata file (csv, json, jsonl) over a folder of images, sized as the reference sizes them.

A row is a dict: `image`, `prompt` and any extra columns (`edit_image`, ...), passed through. Columns named in
`data_file_keys` are image paths (or lists of them, in json) relative to the base path; they are loaded as RGB and
cropped/resized with the reference's ImageCropAndResize rule (`crop_and_resize`).

A row whose image is missing or unreadable comes back as a `Skipped` marker, not an exception, so that DataLoader
workers can report it to the main process; the trainer counts and lists them at the end. With strict=True missing
files stop the run before training starts (all of them listed) and an unreadable one stops it when met.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .config import DataConfig

SIZE_MULTIPLE = 16  # the VAE downsamples by 8 and the DiT patchifies 2x2


def read_metadata(path: str | os.PathLike) -> list[dict]:
    """Rows of a .csv (header + rows), .json (a list of objects) or .jsonl (one object a line) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset metadata {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json metadata file must hold a list of objects, one per sample")
    elif suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"{path}: metadata must be .csv, .json or .jsonl")
    for k, row in enumerate(rows):
        if not isinstance(row, dict) or "image" not in row or "prompt" not in row:
            raise ValueError(f"{path}: sample {k} needs an 'image' and a 'prompt' field, got {row!r}")
    if not rows:
        raise ValueError(f"{path}: the metadata lists no samples")
    return rows


def target_size(width: int, height: int, config: DataConfig) -> tuple[int, int]:
    """(height, width) an image is trained at: fixed, or its own size scaled down to max_pixels, floored to 16."""
    if config.height is not None:
        return config.height, config.width
    if width * height > config.max_pixels:
        scale = (width * height / config.max_pixels) ** 0.5
        height, width = int(height / scale), int(width / scale)
    return height // SIZE_MULTIPLE * SIZE_MULTIPLE, width // SIZE_MULTIPLE * SIZE_MULTIPLE


def crop_and_resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale (bilinear) so the image covers height x width, then crop the centre: torchvision's resize and
    center_crop on a PIL image, as the reference's ImageCropAndResize calls them."""
    scale = max(width / image.width, height / image.height)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    left = int(round((image.width - width) / 2.0))
    top = int(round((image.height - height) / 2.0))
    return image.crop((left, top, left + width, top + height))


@dataclass(frozen=True)
class Skipped:
    """A sample left out: which file and why."""

    index: int
    path: str
    reason: str


class ImageDataset(torch.utils.data.Dataset):
    """len = rows x repeat; item i is row i % rows with its image columns loaded and sized (or a Skipped)."""

    def __init__(self, config: DataConfig):
        self.config = config
        self.base_path = Path(config.base_path)
        self.rows = read_metadata(config.metadata_path)
        missing = [(k, p) for k, row in enumerate(self.rows) for p in self._paths(row) if not p.is_file()]
        if missing and config.strict:
            shown = "\n  ".join(str(p) for _, p in missing[:50])
            raise FileNotFoundError(f"{len(missing)} image(s) listed in {config.metadata_path} do not exist "
                                    f"(strict mode):\n  {shown}")
        self.missing = {k for k, _ in missing}

    def _paths(self, row: dict) -> list[Path]:
        paths = []
        for key in self.config.data_file_keys:
            value = row.get(key)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and item:
                    paths.append(self.base_path / item)
        return paths

    def __len__(self) -> int:
        return len(self.rows) * self.config.repeat

    def _load(self, path: Path) -> Image.Image:
        try:
            with Image.open(path) as f:
                image = f.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise _Unreadable(str(path), f"{type(e).__name__}: {e}") from None
        if image.width < 1 or image.height < 1:
            raise _Unreadable(str(path), "zero-sized image")
        height, width = target_size(image.width, image.height, self.config)
        if height < SIZE_MULTIPLE or width < SIZE_MULTIPLE:
            raise _Unreadable(str(path), f"{image.width}x{image.height} is too small to train at (under 16 pixels "
                              "on a side after sizing)")
        return crop_and_resize(image, height, width)

    def _column(self, key: str, value, row_index: int):
        """A file column's value loaded: a path, or a list of paths (several edit images, one mask per entity) loaded
        element-wise, each sized by its own dimensions as the reference's operators do."""
        paths = value if isinstance(value, list) else [value]
        bad = [v for v in paths if not isinstance(v, str) or not v]
        if bad:
            raise ValueError(f"sample {row_index}: {key} must be a file path or a list of file paths, got {value!r}")
        images = [self._load(self.base_path / v) for v in paths]
        return images if isinstance(value, list) else images[0]

    def __getitem__(self, index: int):
        row_index = index % len(self.rows)
        sample = dict(self.rows[row_index])
        try:
            for key in self.config.data_file_keys:
                if sample.get(key) not in (None, ""):  # an optional input (context_image) may be left out
                    sample[key] = self._column(key, sample[key], row_index)
        except _Unreadable as e:
            if self.config.strict:
                raise ValueError(f"sample {row_index}: cannot read {e.path} ({e.reason}) (strict mode)") from None
            return Skipped(row_index, e.path, e.reason)
        sample["prompt"] = "" if sample["prompt"] is None else str(sample["prompt"])
        return sample


class _Unreadable(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(path)
        self.path, self.reason = path, reason


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same order."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


def skip_report(skipped: list[Skipped]) -> str:
    """One message naming every distinct file left out, and how many samples that cost."""
    files = {}
    for s in skipped:
        files.setdefault(s.path, s.reason)
    lines = "\n".join(f"  {path}: {reason}" for path, reason in files.items())
    return (f"skipped {len(skipped)} sample(s) whose images could not be read ({len(files)} file(s)); "
            f"fix or remove them, or use strict mode to stop at the first:\n{lines}")
