"""The encoded-sample cache: every sample through the text encoder and VAE once, kept on disk under keys that go
stale with anything the encoding depends on.

Design note. The reference splits training into two runs (`--task sft:data_process`, then `sft:train`); here one
run does both. `build_cache` encodes the samples the folder lacks, then the trainer lets the text encoder and VAE
go and the DiT trains from the folder. Layout of the folder:
  entries/<key>.safetensors   one EncodedSample: its tensors, and in the header metadata the JSON tree of its
                              dataclass fields (walked generically, so fields added to EncodedSample need nothing here)
  entries/<key>.skipped.json  a row whose image could not be read: its Skipped record
  index.json                  the rows in metadata order -> their keys, and what the keys were made from
A key is the sha256 of: the cache format and qistudio versions; a fingerprint of the text encoder and VAE weights
(sampled values of every tensor), the tokenizer, the processor and the DiT/ControlNet configs; every setting that
can change an encoding (all TrainConfig fields but those listed in TRAINING_ONLY, so a setting added later counts
until someone says otherwise); the device type and dtype; the row's metadata; and the size and modification time
of each file the row names. A changed prompt, image, model or size setting gives another key: the old entry is
never found, so it is re-encoded rather than reused, and after a build entries no row uses are deleted (one cache
folder per dataset and model). Every file is written to a temporary name and renamed.

With several processes each encodes every P-th missing entry and all wait for each other (accelerate), so the
folder is complete before any of them trains from it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from tqdm import tqdm

from .. import __version__
from ..components import Components
from ..lora.files import write_safetensors
from .config import TrainConfig
from .data import ImageDataset, Skipped
from .encode import EncodedSample
from .outputs import write_text_atomic
from .tree import flatten, unflatten

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
ENTRIES = "entries"
INDEX = "index.json"
STRUCTURE_KEY = "qistudio_encoded_sample"
# TrainConfig fields that cannot change what a sample encodes to. Everything else is part of the key.
TRAINING_ONLY = {
    "output_path", "model_paths", "model_id_with_origin_paths", "tokenizer_path", "processor_path",
    "trainable_models", "lora_base_model", "lora_target_modules", "lora_rank", "lora_alpha", "lora_checkpoint",
    "learning_rate", "weight_decay", "num_epochs", "max_steps", "gradient_accumulation_steps", "lr_scheduler",
    "lr_warmup_steps", "use_gradient_checkpointing", "use_gradient_checkpointing_offload", "find_unused_parameters",
    "loss", "seed", "device", "remove_prefix_in_ckpt", "save_steps", "lora_format", "keep_checkpoints",
    "cache_dir", "buckets", "validation_prompts", "validation_steps", "validation_size", "validation_cfg_scale",
    "validation_num_inference_steps", "validation_seed", "enable_tensorboard_log", "enable_csv_log",
    "initialize_model_on_cpu", "fp8_base", "vram_limit", "compile", "checkpointed_blocks",
}  # fmt: skip
DATA_TRAINING_ONLY = {"base_path", "metadata_path", "repeat", "num_workers", "strict"}  # rows and files are keyed
WEIGHT_SAMPLES = 64  # values read from each tensor for the weights fingerprint


# -- EncodedSample <-> file (tree.py: tensors plus a JSON tree, no pickle) ---------------------------------------------
def _ours(name: str) -> bool:
    # Only our own classes: a cache file must not be able to make the reader import anything else.
    return name.split(":")[0] == "qistudio" or name.startswith("qistudio.")


def write_entry(path: Path, sample: EncodedSample) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten(sample, tensors, _ours, "sample")
    write_safetensors(tensors, path, metadata={STRUCTURE_KEY: json.dumps(structure)})


def read_entry(path: Path) -> EncodedSample:
    with safe_open(str(path), framework="pt") as f:
        structure = json.loads(f.metadata()[STRUCTURE_KEY])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return unflatten(structure, tensors, _ours)


# -- keys -------------------------------------------------------------------------------------------------------------
def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every tensor's name, shape, dtype and WEIGHT_SAMPLES values spread over it: another checkpoint
    (or a fine-tuned one) differs in them, and reading them costs milliseconds where hashing 16 GB would not."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        flat = tensor.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // WEIGHT_SAMPLES)][:WEIGHT_SAMPLES].float().cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(picked.numpy().tobytes())
    return digest.hexdigest()


def _text_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def encoding_fingerprint(components: Components, config: TrainConfig, device, dtype: torch.dtype) -> dict:
    """What every entry's key depends on besides its own row (JSON; index.json shows it)."""
    tokenizer = components.tokenizer
    settings = {k: v for k, v in config.to_dict().items() if k not in TRAINING_ONLY}
    settings["data"] = {k: v for k, v in settings["data"].items() if k not in DATA_TRAINING_ONLY}
    processor = getattr(components.processor, "image_processor", None)
    return {
        "format": CACHE_FORMAT,
        "qistudio": __version__,
        "text_encoder": weights_digest(components.text_encoder),
        "vae": weights_digest(components.vae),
        "tokenizer": None if tokenizer is None else _text_digest([type(tokenizer).__name__,
                                                                  sorted(tokenizer.get_vocab().items())]),
        "processor": None if processor is None else _text_digest(processor.to_dict()),
        "dit": repr(components.dit.config),
        "controlnets": [repr(net.config) for net in components.controlnets],
        "settings": settings,
        "device": torch.device(device).type,
        "dtype": str(dtype),
    }


def row_files(row: dict, dataset: ImageDataset) -> list[str]:
    """The files a row names in its data_file_keys columns (as written there; lists element-wise)."""
    names = []
    for key in dataset.config.data_file_keys:
        value = row.get(key)
        names += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v]
    return names


def row_keys(dataset: ImageDataset, fingerprint: dict) -> list[str]:
    """One key per metadata row (repeats share their row's entry)."""
    common = _text_digest(fingerprint)
    keys = []
    for row in dataset.rows:
        files = []
        for name in row_files(row, dataset):
            try:
                stat = os.stat(dataset.base_path / name)
                files.append([name, stat.st_size, stat.st_mtime_ns])
            except (OSError, ValueError):  # ValueError: a name no file can have (a NUL byte); the row is skipped
                files.append([name, None, None])  # missing: the key changes once the file appears
        keys.append(_text_digest([common, row, files]))
    return keys


# -- the folder -------------------------------------------------------------------------------------------------------
def entry_path(folder: Path, key: str) -> Path:
    return folder / ENTRIES / f"{key}.safetensors"


def skipped_path(folder: Path, key: str) -> Path:
    return folder / ENTRIES / f"{key}.skipped.json"


class CachedDataset(torch.utils.data.Dataset):
    """The training items from the cache: item i is row i % rows as an EncodedSample on the CPU (or a Skipped)."""

    def __init__(self, folder: Path, keys: list[str], length: int):
        self.folder, self.keys, self.length = Path(folder), keys, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        key = self.keys[index % len(self.keys)]
        path = entry_path(self.folder, key)
        if path.is_file():
            return read_entry(path)
        skipped = skipped_path(self.folder, key)
        if skipped.is_file():
            return Skipped(**json.loads(skipped.read_text()))
        raise FileNotFoundError(f"the sample cache {self.folder} lost the entry of row {index % len(self.keys)} "
                                f"({path.name}) during training; run again to rebuild it")


@dataclass
class CacheReport:
    reused: int  # distinct entries found in the folder
    encoded: int  # distinct entries encoded by this run (all processes)
    removed: int  # stale entries deleted


def build_cache(folder: str | os.PathLike, dataset: ImageDataset, fingerprint: dict,
                encode: Callable[[dict], EncodedSample], load: Callable[[list[int]], Iterable], accelerator,
                progress_bar: bool = True) -> tuple[CachedDataset, CacheReport]:
    """Encode the rows the folder lacks (this process: every P-th of them) and return the dataset over it.

    `encode` turns a loaded sample into an EncodedSample; `load(rows)` yields the dataset's items for those rows."""
    folder = Path(folder)
    keys = row_keys(dataset, fingerprint)
    first_row = {}
    for row, key in enumerate(keys):
        first_row.setdefault(key, row)
    if accelerator.is_main_process:
        (folder / ENTRIES).mkdir(parents=True, exist_ok=True)
    # Every process lists what is missing before any of them writes, so they all split the same list.
    missing = [row for key, row in first_row.items()
               if not entry_path(folder, key).is_file() and not skipped_path(folder, key).is_file()]
    accelerator.wait_for_everyone()
    share = missing[accelerator.process_index :: accelerator.num_processes]
    bar = tqdm(total=len(missing), disable=not (progress_bar and accelerator.is_main_process), unit="sample",
               desc="encoding into the cache")
    for row, item in zip(share, load(share)):
        key = keys[row]
        if isinstance(item, Skipped):
            write_text_atomic(skipped_path(folder, key), json.dumps(item.__dict__))
        else:
            write_entry(entry_path(folder, key), encode(item))
        bar.update(accelerator.num_processes)
    bar.close()
    accelerator.wait_for_everyone()
    removed = 0
    if accelerator.is_main_process:
        removed = _finish(folder, keys, fingerprint)
    accelerator.wait_for_everyone()
    report = CacheReport(len(first_row) - len(missing), len(missing), removed)
    if accelerator.is_main_process:
        logger.info("sample cache %s: %d entries reused, %d encoded, %d stale removed", folder, report.reused,
                    report.encoded, report.removed)
    return CachedDataset(folder, keys, len(dataset)), report


def _finish(folder: Path, keys: list[str], fingerprint: dict) -> int:
    """Check that every row has its entry, write index.json, delete entries no row uses; returns how many."""
    absent = [row for row, key in enumerate(keys)
              if not entry_path(folder, key).is_file() and not skipped_path(folder, key).is_file()]
    if absent:
        raise RuntimeError(f"the sample cache {folder} lacks the entries of rows {absent[:10]} after encoding (did a "
                           "process fail?); run again to encode them")
    index = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "rows": keys}
    write_text_atomic(folder / INDEX, json.dumps(index, indent=1, default=str) + "\n")
    used = set(keys)
    removed = 0
    for path in (folder / ENTRIES).iterdir():
        key = path.name.split(".")[0]
        if key not in used and not path.name.startswith("."):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def release_encoders(components: Components, keep_on_cpu: bool) -> None:
    """Once the cache holds every sample: drop the text encoder and VAE, or (when validation images still need
    them) move them to host memory, off the device the DiT trains on."""
    if keep_on_cpu:
        components.text_encoder.to("cpu")
        components.vae.to("cpu")
    else:
        components.text_encoder = None
        components.vae = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
