"""What `qistudio serve` and `qistudio ui` load: the model's family, its ModelConfigs, its ControlNets and a
Qwen-Image-Layered model beside it, as the engine's ModelSpec.

The family is told from the model as `qistudio generate` tells it: Qwen-Image 2.1 by its hub id or its folder's
classes (generate21.is_qwen21_model), Qwen-Image-Layered by its hub id or its DiT's config (use_layer3d_rope),
anything else is Qwen-Image (Edit, 2512, ...). The workers check it against the files they load. `--demo` serves
the tiny demo model with its tiny canny ControlNet and Layered model (demo_family.py), so that every feature runs
offline. Torch is not imported here.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .generate import HUB_MODEL
from .generate21 import is_qwen21_model

HUB_LAYERED = re.compile(r"[\w.-]+/Qwen-Image-Layered[\w.-]*")
QWEN_IMAGE, LAYERED, QWEN21 = "qwen-image", "qwen-image-layered", "qwen-image-2.1"  # engine.models' families


def is_layered_model(model: str | None) -> bool:
    """Qwen/Qwen-Image-Layered (or a repository named like it), or a folder whose DiT config says layer-3D RoPE."""
    if not model:
        return False
    folder = Path(model).expanduser()
    if folder.is_dir():
        try:
            config = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and bool(config.get("use_layer3d_rope"))
    return bool(HUB_LAYERED.fullmatch(model))


def family_of(model: str | None) -> str:
    if is_qwen21_model(model):
        return QWEN21
    return LAYERED if is_layered_model(model) else QWEN_IMAGE


def check_family_flags(args: argparse.Namespace) -> None:
    """--controlnet and --layered-model only beside a Qwen-Image model, each kind once; before anything loads."""
    error = args.parser.error
    family = QWEN_IMAGE if args.demo else family_of(args.model or HUB_MODEL)
    kinds = [item.split("=", 1)[0] for item in args.controlnets]
    if args.demo and (kinds or args.layered_model):
        error("--demo serves its own tiny canny ControlNet and Layered model; --controlnet and --layered-model "
              "go with --model")
    if family != QWEN_IMAGE and (kinds or args.layered_model):
        error(f"--controlnet and --layered-model go beside a Qwen-Image model, not {args.model}")
    if len(set(kinds)) != len(kinds):
        error(f"--controlnet: each kind once, got {', '.join(kinds)}")
    if args.layered_model and not is_layered_model(args.layered_model):
        error(f"--layered-model {args.layered_model}: not a Qwen-Image-Layered model (a hub id like "
              "Qwen/Qwen-Image-Layered, or a folder whose transformer/config.json has use_layer3d_rope)")


def _controlnets(args: argparse.Namespace) -> list:
    """(kind, ModelConfig) per --controlnet, in order (a job names them by kind)."""
    from .generate import controlnet_configs

    sources = dict(item.split("=", 1) for item in args.controlnets if "=" in item)
    kinds = [item.split("=", 1)[0] for item in args.controlnets]
    configs, _ = controlnet_configs({"control_data": [(kind,) for kind in kinds], "controlnet_sources": sources}, args)
    return list(zip(kinds, configs))


def _fetch(configs) -> None:
    from ..weights.hub import resolve_files

    for config in configs:
        if config is not None and config.model_id is not None:
            print(f"fetching {config.model_id} {config.origin_file_pattern}", file=sys.stderr)
            resolve_files(config)
            config.skip_download = True  # the workers read what is now on disk


def _demo_family():
    """The demo's tiny ControlNet and Layered model: ((name, ModelConfig),), (configs, tokenizer, processor)."""
    from ..demo import default_demo_dir, write_demo_model
    from ..demo_family import write_demo_controlnet, write_demo_layered
    from ..weights.model_config import ModelConfig
    from .generate import _folder_configs

    demo = write_demo_model(default_demo_dir())
    configs, tokenizer, processor = _folder_configs(demo)
    layered = write_demo_layered(demo)
    layered_configs = [ModelConfig(path=str(layered / "transformer")), configs[1], ModelConfig(path=str(layered / "vae"))]
    return [("canny", ModelConfig(path=str(write_demo_controlnet(demo))))], (layered_configs, tokenizer, processor)


def model_spec(args: argparse.Namespace, fetch: bool = True):
    """The engine's ModelSpec for the model the flags name (hub files fetched once here, with `fetch`)."""
    from ..engine import ModelSpec
    from .generate import model_configs

    model = None if args.demo else args.model or HUB_MODEL
    family = QWEN_IMAGE if args.demo else family_of(model)
    edit = bool(model and "edit" in model.lower()) or family == LAYERED  # Layered's caption reads the image
    configs, tokenizer, processor = model_configs({"demo": args.demo, "model": model, "edit": edit}, args)
    controlnets, layered = _demo_family() if args.demo else (_controlnets(args), None)
    if getattr(args, "layered_model", None):
        layered = model_configs({"demo": False, "model": args.layered_model, "edit": True}, args)
    if fetch:
        _fetch([*configs, tokenizer, processor, *(c for _, c in controlnets), *(layered[0] if layered else ()),
                *(layered[1:] if layered else ())])
    options = dict(dtype=args.dtype, fp8=args.fp8, vram_limit=args.vram_limit, compile=args.compile)
    layered_spec = None
    if layered is not None:
        name = "qistudio-demo-layered" if args.demo else args.layered_model
        layered_spec = ModelSpec.from_configs(name, *layered, family=LAYERED, **options)
    name = "qistudio-demo" if args.demo else model
    return ModelSpec.from_configs(name, configs, tokenizer, processor, controlnets=controlnets, family=family,
                                  layered=layered_spec, extra={"demo": args.demo, "model": model}, **options)
