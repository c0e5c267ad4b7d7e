"""`qistudio generate --model Qwen/Qwen-Image-2.1`: what differs for Qwen-Image 2.1 from the 20B family's flags.

generate.py calls three things here: `qwen21_settings` while it resolves the settings (2.1's defaults, 40 steps,
no guidance, 1024x1024 or the last edit image's aspect, and a refusal of the 20B-only flags before any model
loads), `qwen21_model_configs` for the weights (2.1's repository has processor/ and no tokenizer/), and
`pipe_call` for the call (the 2.1 pipeline's arguments). Torch is not imported here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

QWEN21_MODELS = ("Qwen/Qwen-Image-2.1",)
QWEN21_STEPS, QWEN21_CFG, QWEN21_SIZE = 40, 1.0, (1024, 1024)
QWEN21_CLASSES = {"QwenImage21Pipeline", "QwenImage21Transformer2DModel"}
SUBFOLDERS = ("transformer", "text_encoder", "vae", "processor")
HUB_PATTERNS = ("transformer/diffusion_pytorch_model*.safetensors", "text_encoder/model*.safetensors",
                "vae/diffusion_pytorch_model.safetensors")
# 20B-family features (their settings keys and flags) that Qwen-Image 2.1 does not take.
NOT_FOR_QWEN21 = {"input_image": "--input-image", "entities": "--entity", "controls": "--control",
                  "controlnets": "--controlnet", "inpaint_mask": "--inpaint-mask", "context_image": "--context-image",
                  "cache": "--cache"}


def _class_name(path: Path) -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def is_qwen21_model(model: str | None) -> bool:
    """A 2.1 hub id (Qwen/Qwen-Image-2.1 or a repository named like it), or a folder whose model_index.json or
    transformer/config.json names 2.1's classes."""
    if not model:
        return False
    folder = Path(model).expanduser()
    if folder.is_dir():
        return bool({_class_name(folder / "model_index.json"), _class_name(folder / "transformer" / "config.json")}
                    & QWEN21_CLASSES)
    return model in QWEN21_MODELS or bool(re.fullmatch(r"[\w.-]+/Qwen-Image-2\.1[\w.-]*", model))


def qwen21_settings(settings: dict, given: set[str], error) -> None:
    """2.1's defaults for what was not given (flags or --from-png), and one error for a 20B-only flag."""
    if settings.get("demo") or not is_qwen21_model(settings.get("model")):
        return
    used = [flag for key, flag in NOT_FOR_QWEN21.items() if settings.get(key)]
    if used:
        error(f"{', '.join(used)}: not supported with Qwen-Image 2.1 (it takes a prompt, --edit-image (1-10), "
              "--negative, --cfg, --steps, --size, --seed, --lora, --tiled)")
    if len(settings.get("edit_images") or []) > 10:
        error(f"Qwen-Image 2.1 takes 1 to 10 --edit-image, got {len(settings['edit_images'])}")
    settings.setdefault("steps", QWEN21_STEPS)
    if "cfg" not in given:
        settings["cfg"] = QWEN21_CFG
    if "size" not in given and not settings.get("edit_images"):
        settings["size"] = QWEN21_SIZE


def qwen21_model_configs(model: str, args) -> tuple[list, None, object]:
    """(model configs, no tokenizer, the processor) for a 2.1 folder or hub id."""
    from ..weights.model_config import ModelConfig

    folder = Path(model).expanduser()
    if folder.is_dir():
        missing = [name + "/" for name in SUBFOLDERS if not (folder / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"--model {model}: the folder has no {', '.join(missing)}")
        folder = folder.resolve()
        return ([ModelConfig(path=str(folder / name)) for name in SUBFOLDERS[:3]], None,
                ModelConfig(path=str(folder / "processor")))
    hub = dict(model_id=model, download_source=args.download_source, local_model_path=args.model_dir,
               skip_download=args.skip_download)
    return ([ModelConfig(origin_file_pattern=pattern, **hub) for pattern in HUB_PATTERNS], None,
            ModelConfig(origin_file_pattern="processor/", **hub))


def pipe_call(pipe, settings: dict):
    """The callable that takes generate.py's call arguments: the pipeline itself, or for 2.1 an adapter passing
    what 2.1 takes (qwen21_settings refused the rest before loading)."""
    from ..pipeline21 import QwenImage21Pipeline

    if not isinstance(pipe, QwenImage21Pipeline):
        return pipe

    def call(prompt, negative_prompt, cfg_scale, height, width, edit_image, seed, num_inference_steps, tiled,
             progress_bar_cmd, **_not_for_21):
        if edit_image is not None and not isinstance(edit_image, list):
            edit_image = [edit_image]
        return pipe(prompt, negative_prompt=negative_prompt, cfg_scale=cfg_scale, edit_image=edit_image,
                    height=height, width=width, seed=seed, num_inference_steps=num_inference_steps, tiled=tiled,
                    progress_bar_cmd=progress_bar_cmd)

    return call
