"""Training samples: a metadata file (csv, json, jsonl) over a folder of images, sized as the reference sizes them.

A row is a dict: `image`, `prompt` and any extra columns (`edit_image`, ...), passed through. Columns named in
`data_file_keys` are image paths (or lists of them, in json) relative to the base path; they are read as inference
reads them (imageio: EXIF orientation applied, 16-bit and float images scaled, pictures' alpha flattened on white,
masks' dropped), as RGB, and cropped/resized with the reference's ImageCropAndResize rule (`crop_and_resize`).

A row that cannot be used comes back as a `Skipped` marker, not an exception, so that DataLoader workers can
report it to the main process; the trainer counts and lists them at the end (and a resumed run goes on counting).
That is a missing or unreadable image (not an image, damaged, a decompression bomb, too small), and a malformed
cell: an empty image cell, a list where one path belongs (only edit_image and eligen_entity_masks take lists),
anything but text as a path or prompt, or a row the pipeline's own request checks refuse (`check`). With
strict=True missing files stop the run before training starts (all of them listed) and any other such row stops it
when met. What the metadata file itself gets wrong (not csv/json/jsonl, bad JSON, a row without an image or prompt
field) is one error naming the file and the line or sample, before anything loads.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..imageio import load_image, load_mask, read_image
from .config import DataConfig

SIZE_MULTIPLE = 16  # the VAE downsamples by 8 and the DiT patchifies 2x2
LIST_KEYS = ("edit_image", "eligen_entity_masks")  # file columns that may hold several paths (a json list)
MASK_KEYS = ("blockwise_controlnet_inpaint_mask", "eligen_entity_masks")  # read as masks: alpha dropped, not flattened


def read_metadata(path: str | os.PathLike) -> list[dict]:
    """Rows of a .csv (header + rows), .json (a list of objects) or .jsonl (one object a line) file; whatever is
    wrong with the file is one ValueError naming it (and the line or sample)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset metadata {path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".csv"):
        raise ValueError(f"{path}: metadata must be .csv, .json or .jsonl")
    try:
        rows = _parse_metadata(path, suffix)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable CSV file ({e})") from None
    for k, row in enumerate(rows):
        if not isinstance(row, dict) or "image" not in row or "prompt" not in row:
            raise ValueError(f"{path}: sample {k} needs an 'image' and a 'prompt' field, got {str(row)[:200]}")
    if not rows:
        raise ValueError(f"{path}: the metadata lists no samples")
    return rows


def _parse_metadata(path: Path, suffix: str) -> list:
    if suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json metadata file must hold a list of objects, one per sample")
        return rows
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({e})") from None
        return rows
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "image" not in reader.fieldnames:
            raise ValueError(f"{path}: the first line of a .csv must name the columns, with image and prompt among "
                             f"them; got {reader.fieldnames}")
        # A short row leaves its last cells None (empty); a long one puts the extra cells under None: dropped.
        return [{k: v for k, v in row.items() if k is not None} for row in reader]


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
    """len = rows x repeat; item i is row i % rows with its image columns loaded and sized (or a Skipped).

    `check(sample)`, when given, raises ValueError or TypeError for a loaded sample that cannot be trained on (the
    trainer passes the pipeline's request checks); such a sample is skipped like an unreadable one. It must be
    picklable (DataLoader workers): a module-level function or a functools.partial of one.

    `rgba_keys` are read with their alpha kept (RGBA) and `list_keys` may list several files: the model's rules
    (family.DataRules: Qwen-Image-Layered's frames, Qwen-Image 2.1's RGBA images); the defaults are Qwen-Image's."""

    def __init__(self, config: DataConfig, check: Callable[[dict], object] | None = None,
                 rgba_keys: tuple[str, ...] = (), list_keys: tuple[str, ...] = LIST_KEYS):
        self.config = config
        self.check = check
        self.rgba_keys, self.list_keys = rgba_keys, list_keys
        self.base_path = Path(config.base_path)
        self.rows = read_metadata(config.metadata_path)
        missing = [(k, p) for k, row in enumerate(self.rows) for p in self._paths(row) if not _is_file(p)]
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
                if isinstance(item, str) and item.strip():
                    paths.append(self.base_path / item)
        return paths

    def __len__(self) -> int:
        return len(self.rows) * self.config.repeat

    def _load(self, path: Path, key: str) -> Image.Image:
        try:
            if key in self.rgba_keys:
                image = read_image(path, key).convert("RGBA")  # alpha kept: the model reads and makes RGBA
            else:
                image = (load_mask if key in MASK_KEYS else load_image)(path, key)
        except ValueError as e:  # imageio's InputError: missing, not an image, damaged, too large; names the file
            raise _Unreadable(str(path), str(e)) from None
        if image.width < 1 or image.height < 1:
            raise _Unreadable(str(path), "zero-sized image")
        height, width = target_size(image.width, image.height, self.config)
        if height < SIZE_MULTIPLE or width < SIZE_MULTIPLE:
            raise _Unreadable(str(path), f"{image.width}x{image.height} is too small to train at (under 16 pixels "
                              "on a side after sizing)")
        return crop_and_resize(image, height, width)

    def _cell_problem(self, sample: dict) -> str | None:
        """What is wrong with the row's cells (before any file is read), or None."""
        for key in self.config.data_file_keys:
            value = sample.get(key)
            if key == "image" and (value is None or (isinstance(value, (str, list)) and not str(value).strip("[] "))):
                return "its image cell is empty"
            if value is None or (isinstance(value, (str, list)) and not value):
                continue  # an optional input (context_image, ...) left out
            if isinstance(value, list) and key not in self.list_keys:
                return f"its {key} cell holds a list ({_short(value)}); {key} takes one file path"
            if not all(isinstance(v, str) and v.strip() for v in (value if isinstance(value, list) else [value])):
                what = "a file path or a list of them" if key in self.list_keys else "a file path"
                return f"its {key} cell must be {what}, got {_short(value)}"
        prompt = sample.get("prompt")
        if not (prompt is None or isinstance(prompt, (str, int, float))) or isinstance(prompt, bool):
            return f"its prompt must be text, got {_short(prompt)}"
        return None

    def _column(self, key: str, value):
        """A file column's value loaded: a path, or a list of paths (several edit images, one mask per entity) loaded
        element-wise, each sized by its own dimensions as the reference's operators do."""
        if isinstance(value, list):
            return [self._load(self.base_path / v, key) for v in value]
        return self._load(self.base_path / value, key)

    def __getitem__(self, index: int):
        row_index = index % len(self.rows)
        sample = dict(self.rows[row_index])
        row = f"{self.config.metadata_path}, sample {row_index}"
        try:
            problem = self._cell_problem(sample)
            if problem is not None:
                raise _Unreadable(row, problem)
            for key in self.config.data_file_keys:
                if sample.get(key) not in (None, "", []):  # an optional input (context_image) may be left out
                    sample[key] = self._column(key, sample[key])
            sample["prompt"] = "" if sample["prompt"] is None else str(sample["prompt"])
            if self.check is not None:
                try:
                    self.check(sample)
                except (ValueError, TypeError) as e:
                    raise _Unreadable(row, f"{type(e).__name__}: {e}") from None
        except _Unreadable as e:
            if self.config.strict:
                raise ValueError(f"sample {row_index}: cannot read {e.path} ({e.reason}) (strict mode)") from None
            return Skipped(row_index, e.path, e.reason)
        return sample


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name the file system cannot hold (a NUL byte, too long)
        return False


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Unreadable(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(path)
        self.path, self.reason = path, reason


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same order."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


def skip_report(skipped: list[Skipped]) -> str:
    """One message naming every distinct file (or metadata row) left out and why, and how many samples that cost."""
    files = {}
    for s in skipped:
        files.setdefault(s.path, s.reason)
    lines = "\n".join(f"  {path}: {reason}" for path, reason in files.items())
    return (f"skipped {len(skipped)} sample(s) that could not be read or used ({len(files)} file(s) or row(s)); "
            f"fix or remove them, or use strict mode to stop at the first:\n{lines}")
