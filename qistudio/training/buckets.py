"""Size buckets for dynamic resolution: an epoch order in which every process trains a sample of the same size at
the same step.

Design note. With dynamic resolution each sample keeps its own (scaled-down) size, so under plain shuffling one
process may get a 1024x1024 image while another gets a 512x768 one, and the faster waits for the slower at every
gradient reduction. The bucketed order cuts the epoch into steps, the P x K samples of one optimizer step (P
processes, K micro-batches each; process r takes items r, r + P, ... as with the plain order), each step of one
target size:
  1. shuffle the items with the plain order's generator (data.epoch_order(n, seed, epoch));
  2. group them by target size, keeping that shuffled order inside each group;
  3. cut each group into steps of P x K; the fewer left over from each group are pooled, the epoch's
     remainder (n mod P, dropped by the plain order too) is dropped from the pool's end, and the rest is sorted by
     pixel count and cut into steps, so the few mixed steps pair the closest sizes;
  4. shuffle the steps with a second generator seeded from (seed, epoch), a last step shorter than P x K (the
     epoch's partial accumulation) kept last.
The order is a function of (seed, epoch, sizes, P x K, n mod P) alone, so a resumed run continues it exactly
(also under another P with the same P x K), and it has len(items) // P micro-batches per process, as the plain
order has. Samples are never resized to fit a bucket: each trains at the size the reference gives it.

`buckets` setting: True, False, or None (the default) for "on with dynamic resolution and several processes":
with one process there is nothing to balance and the plain order is kept; with a fixed size there is one bucket.
"""

from __future__ import annotations

import torch
from PIL import Image

from .config import DataConfig
from .data import ImageDataset, epoch_order, target_size

Size = tuple[int, int]  # (height, width) a sample trains at


def buckets_on(setting: bool | None, data: DataConfig, num_processes: int) -> bool:
    if setting is not None:
        return setting
    return data.height is None and num_processes > 1


def row_sizes(dataset: ImageDataset) -> list[Size | None]:
    """Per metadata row, the target size of its image from the file's header (no decoding); None when the image
    cannot be read (the trainer skips it)."""
    sizes = []
    for row in dataset.rows:
        name = row.get("image")
        name = name[0] if isinstance(name, list) and name else name
        try:
            with Image.open(dataset.base_path / name) as image:
                sizes.append(target_size(image.width, image.height, dataset.config))
        except (OSError, ValueError, TypeError, Image.DecompressionBombError):
            sizes.append(None)
    return sizes


def item_sizes(dataset: ImageDataset) -> list[Size | None]:
    """Per dataset item (rows x repeat), its row's target size."""
    sizes = row_sizes(dataset)
    return [sizes[i % len(sizes)] for i in range(len(dataset))]


def _pixels(size: Size | None) -> int:
    return 0 if size is None else size[0] * size[1]


def bucketed_order(sizes: list[Size | None], num_processes: int, seed: int, epoch: int,
                   accumulation: int = 1) -> list[int]:
    """The epoch's item order: the len(sizes) - len(sizes) % P items in groups of the P x K samples of one
    optimizer step (K: gradient accumulation), each group one size wherever the sizes allow. Only the P x K
    matter, so P processes order the epoch as one process accumulating P x K micro-batches does."""
    steps_of = num_processes * accumulation
    shuffled = epoch_order(len(sizes), seed, epoch)
    groups: dict[Size | None, list[int]] = {}
    for item in shuffled:
        groups.setdefault(sizes[item], []).append(item)
    steps, pool = [], []
    for items in groups.values():
        whole = len(items) // steps_of * steps_of
        steps += [items[k : k + steps_of] for k in range(0, whole, steps_of)]
        pool += items[whole:]
    rank = {item: k for k, item in enumerate(shuffled)}
    pool.sort(key=rank.__getitem__)  # back to the shuffled order: which leftovers are dropped is random
    pool = pool[: len(pool) - len(sizes) % num_processes]
    pool.sort(key=lambda item: (_pixels(sizes[item]), sizes[item] or (0, 0)))
    steps += [pool[k : k + steps_of] for k in range(0, len(pool), steps_of)]
    # A last group shorter than a step (a multiple of P items: the epoch's last, partial accumulation) stays last.
    last = [steps.pop()] if steps and len(steps[-1]) < steps_of else []
    generator = torch.Generator().manual_seed((seed * 100_003 + epoch) ^ 0x5BD1E995)
    order = [steps[k] for k in torch.randperm(len(steps), generator=generator).tolist()] + last
    return [item for step in order for item in step]
