"""Which member of the family a run trains, read from the DiT's files, and what that changes for the data.

Design note. The trainer takes the seed's arguments for every model and adds no flag to say which one it trains:
the DiT's tensor names say it (weights/formats.py, formats21.py), read from the files' headers before anything
loads, so that a dataset or a setting the model cannot take stops the run with one message first.
  qwen_image  Qwen-Image, Edit, 2512 and the ControlNet / EliGen / In-Context variants: encode.py's samples
  layered     Qwen-Image-Layered (the DiT's extra timestep row): training/layered.py
  qwen21      Qwen-Image 2.1 (the single-stream DiT): training/qwen21.py
Each family says how a row is checked and loaded (which columns are RGBA, which may list files) and encoded; the
loop and the loss treat every sample alike (its `pack` and, for the new members, its `velocity`).

The run's other settings need nothing per family: the low-memory mode (--fp8_base, --vram_limit), --compile and
--fsdp act on `dit.transformer_blocks`, which every family's DiT has. 2.1 trains through its DiT's `joint` pass
(models/dit21.py): each block runs once a step over the prefix and the target together, checkpointed under
--use_gradient_checkpointing (the first N blocks under --checkpointed_blocks N). It once ran the prefix's pass then
the target's, each block twice a step, and FSDP2 was refused: on 2 processes, one with a sample that has edit images
and one without, the autograd engine interleaved the two passes' backward by the prefix's shape, so the processes'
per-block gradient reduce-scatters came in different orders (a collective mismatch). With one call per block they come
in block order (tests/test_training_distributed.py trains 2.1 so). Validation images (`validation_inputs`) are the
family's own: Layered splits an input image, 2.1 renders with its pipeline.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

from ..weights.formats import DIT, IGNORED, detect_layout
from ..weights.formats21 import is_qwen21_dit
from ..weights.hub import resolve_files
from ..weights.model_config import ModelConfig
from .config import TrainConfig

QWEN_IMAGE, LAYERED, QWEN21 = "qwen_image", "layered", "qwen21"
NAMES = {QWEN_IMAGE: "Qwen-Image", LAYERED: "Qwen-Image-Layered", QWEN21: "Qwen-Image 2.1"}
LAYERED_INPUTS = ("layer_input_image", "layer_num")
EDIT_INPUT = "edit_image"
# Qwen-Image-Layered renders at one of its trained buckets: validation_size (side, side) -> resolution=side.
LAYERED_VALIDATION_SIDES = (640, 1024)


@dataclass(frozen=True)
class DataRules:
    """How the dataset loads a family's rows: RGBA columns and columns that may list several files."""

    rgba_keys: tuple[str, ...] = ()
    list_keys: tuple[str, ...] = ("edit_image", "eligen_entity_masks")


def family_of_keys(keys) -> str:
    """The family of a DiT checkpoint from its tensor names (any prefix a layout strips, stripped)."""
    layout = detect_layout(keys)
    names = {layout.key_map(k) for k in keys} - {IGNORED}
    if is_qwen21_dit(names):
        return QWEN21
    return LAYERED if "time_text_embed.addition_t_embedding.weight" in names else QWEN_IMAGE


def family_of_components(components) -> str:
    from ..models.dit21 import QwenImage21DiT

    if isinstance(components.dit, QwenImage21DiT):
        return QWEN21
    config = getattr(components.dit, "config", None)
    return LAYERED if getattr(config, "use_additional_t_cond", False) else QWEN_IMAGE


def family_of_files(configs: list[ModelConfig]) -> str:
    """The family of the DiT among the model configs (downloading it when it is a hub id); Qwen-Image when there is
    no DiT or its files are missing (loading reports that, after the checks that need no model)."""
    from ..weights.quantized_source import open_source  # torch

    for config in configs:
        try:
            files = resolve_files(config)
        except FileNotFoundError:
            continue
        source = open_source(files)
        try:
            keys = set(source.keys())
            where = ", ".join(map(str, source.files))
        finally:
            source.close()
        if detect_layout(keys, where).kind == DIT:
            return family_of_keys(keys)
    return QWEN_IMAGE


def check_family(config: TrainConfig, family: str) -> None:
    """The settings and data columns against the model; one ValueError naming the mismatch."""
    name = NAMES[family]
    layered_inputs = [k for k in config.extra_inputs if k in LAYERED_INPUTS]
    if family != LAYERED and (layered_inputs or LAYERED_INPUTS[0] in config.data.data_file_keys):
        raise ValueError(f"{', '.join(layered_inputs) or LAYERED_INPUTS[0]} are Qwen-Image-Layered's inputs, but the "
                         f"DiT is {name}'s; load Qwen/Qwen-Image-Layered's transformer to train on layers")
    if family == QWEN_IMAGE:
        return
    width, height = config.validation_size
    if family == LAYERED and config.validation_prompts and (width != height or width not in LAYERED_VALIDATION_SIDES):
        raise ValueError(f"validation_size={width}x{height}: Qwen-Image-Layered splits the validation image at one of "
                         "its trained resolutions, 640x640 or 1024x1024 (the area; the input image's aspect is kept)")
    if config.trainable_models not in (None, "dit"):
        raise ValueError(f"trainable_models={config.trainable_models!r}: {name} trains a LoRA on the DiT or the whole "
                         "DiT (--trainable_models dit)")
    allowed = LAYERED_INPUTS if family == LAYERED else (EDIT_INPUT,)
    other = [k for k in config.extra_inputs if k not in allowed]
    if other:
        raise ValueError(f"extra_inputs {other} are not {name}'s; it takes {', '.join(allowed)}")
    if family == LAYERED and LAYERED_INPUTS[0] not in config.data.data_file_keys:
        raise ValueError("Qwen-Image-Layered trains on an input image and its layers: list the composite and the "
                         "layers (bottom first) in the image column as a json list, the input image in "
                         "layer_input_image, and pass --data_file_keys image,layer_input_image "
                         "--extra_inputs layer_num,layer_input_image (as DiffSynth-Studio's Qwen-Image-Layered.sh)")


def data_rules(family: str) -> DataRules:
    if family == LAYERED:
        return DataRules(rgba_keys=("image", LAYERED_INPUTS[0]), list_keys=("image",))
    if family == QWEN21:
        return DataRules(rgba_keys=("image", "edit_image"), list_keys=("edit_image",))
    return DataRules()


def row_check(config: TrainConfig, family: str):
    """The picklable check the dataset runs on each loaded row (DataLoader workers take it)."""
    if family == LAYERED:
        from .layered import check_layered_row

        return check_layered_row
    if family == QWEN21:
        from .qwen21 import check_qwen21_row

        return check_qwen21_row
    from .encode import sample_request

    return functools.partial(sample_request, extra_inputs=config.extra_inputs, zero_cond_t=config.zero_cond_t)


def encode_for(family: str, components, sample: dict, config: TrainConfig, device, dtype):
    """A loaded row through the frozen encoders, the family's way."""
    if family == LAYERED:
        from .layered import encode_layered

        return encode_layered(components, sample, device, dtype)
    if family == QWEN21:
        from .qwen21 import encode_qwen21

        if EDIT_INPUT not in config.extra_inputs:  # an edit column the run was not told to read
            sample = {k: v for k, v in sample.items() if k != EDIT_INPUT}
        return encode_qwen21(components, sample, device, dtype)
    from .encode import encode_sample

    return encode_sample(components, sample, config.extra_inputs, config.zero_cond_t, device, dtype)


def images_per_sample(family: str, config: TrainConfig, rows: list[dict]) -> int | None:
    """The most images one of the metadata's rows puts through the DiT at the target's size, for the low-memory
    plan's activation estimate: Layered's frames (composite and layers) and its input image, 2.1's target and edit
    images; None for Qwen-Image (lowmem.sample_tokens counts its extra inputs)."""
    if family == LAYERED:
        return 1 + max((_files(r.get("image")) for r in rows), default=1)
    if family == QWEN21:
        edits = max((_files(r.get(EDIT_INPUT)) for r in rows), default=0) if EDIT_INPUT in config.extra_inputs else 0
        return 1 + edits
    return None


def _files(cell) -> int:
    """How many files a metadata cell names (a list, one path, or none)."""
    return len(cell) if isinstance(cell, list) else int(bool(cell))


def validation_inputs(family: str, sample: dict, config: TrainConfig) -> dict:
    """The pipeline's keyword arguments for the validation images, from a loaded sample: Layered splits its input
    image into as many layers as the sample has, at the validation resolution; 2.1 edits with its edit images (when
    the run reads them), each sized at the validation image's area as training sizes them at the target's;
    Qwen-Image takes the extra inputs (edit, context, ControlNet, EliGen)."""
    if family == LAYERED:
        return dict(image=sample[LAYERED_INPUTS[0]], layers=len(sample["image"]) - 1,
                    resolution=config.validation_size[0])
    if family == QWEN21:
        from .qwen21 import edit_images

        from ..conditioning.qwen21 import MULTIPLE

        edits = edit_images(sample) if EDIT_INPUT in config.extra_inputs else []
        side = max(MULTIPLE, math.isqrt(config.validation_size[0] * config.validation_size[1]) // MULTIPLE * MULTIPLE)
        return dict(edit_image=edits or None, output_resolution=side)
    from .encode import sample_conditions

    return sample_conditions(sample, config.extra_inputs)


def detect_family(config: TrainConfig, components=None, accelerator=None) -> str:
    """The run's family, from the given components or the DiT's files (the main process downloading first), checked
    against the settings."""
    if components is not None:
        family = family_of_components(components)
    else:
        from .models import weight_configs

        with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
            family = family_of_files(weight_configs(config))
    check_family(config, family)
    return family
