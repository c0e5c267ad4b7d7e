"""`qistudio generate`: turn command-line flags into one pipeline call and a PNG that records them.

Settings come from three layers, later ones winning: built-in defaults (smaller for --demo), the parameters
stored in a PNG given with --from-png, and the flags given explicitly. Every flag defaults to None so that
"given" can be told from "defaulted". All checks run before any model loads.

torch and the library's model code are imported inside the functions that need them, so `--help` and the
argument errors answer at once (the choices below are the library's, kept equal by tests/test_cli.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from .. import __version__
from ..fileio import unwritable_folder_reason
from ..caching.config import PRESETS, parse_setting, setting_text
from .generate21 import is_qwen21_model, pipe_call, qwen21_model_configs, qwen21_settings
from .parallel_launch import add_parallel_argument, start_parallel
from .speed import add_speed_arguments, apply_after_loras, apply_before_loras, check_speed_arguments
from .text_encoder_files import check_text_encoder

if TYPE_CHECKING:
    from ..pipeline import QwenImagePipeline
    from ..weights.model_config import ModelConfig

HUB_MODEL = "Qwen/Qwen-Image"
HUB_EDIT_MODEL = "Qwen/Qwen-Image-Edit"
# Edit models that read every edit image through the "Picture k:" template, even a single one.
PICTURE_TEMPLATE_MODELS = {"Qwen/Qwen-Image-Edit-2509", "Qwen/Qwen-Image-Edit-2511"}
PICTURE_TEMPLATE_PIPELINES = {"QwenImageEditPlusPipeline"}  # model_index.json's _class_name in such a folder
SUBFOLDERS = ("transformer", "text_encoder", "vae", "tokenizer")
# The seed's file patterns inside the hub repository, in the order of its quick start.
HUB_PATTERNS = (
    "transformer/diffusion_pytorch_model*.safetensors",
    "text_encoder/model*.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)
DTYPES = ("bfloat16", "float16", "float32")  # torch dtype names
DOWNLOAD_SOURCES = ("modelscope", "huggingface")  # qistudio.weights.model_config.DOWNLOAD_SOURCES
DEFAULTS = dict(negative="", cfg=4.0, tiled=False, demo=False)
DEMO_SIZE, DEMO_STEPS = (256, 256), 8
FULL_SIZE, FULL_STEPS = (1328, 1328), 30
IMG2IMG_STRENGTH = 0.7
LAYOUT_HINT = (
    "Point at weights on disk with --model /path/to/Qwen-Image (a folder laid out like the hub repository: "
    "transformer/ text_encoder/ vae/ tokenizer/), or with --model-dir DIR --skip-download where "
    "DIR/Qwen/Qwen-Image holds files already downloaded."
)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def existing_file(text: str) -> str:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return str(path.resolve())


def seed_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value


def finite_float(text: str) -> float:
    """A number argument; nan and inf are refused (a NaN guidance scale would give a black image without a word)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def strength_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 = ignore the input image), got {value}")
    return value


def lora_spec(text) -> str:
    """'PATH' or 'PATH:SCALE' (a number after the last colon); returned normalised as 'PATH:SCALE'."""
    path, _, scale = str(text).rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        path, value = str(text), 1.0
    if not path:
        raise argparse.ArgumentTypeError(f"expected PATH or PATH:SCALE, got {text!r}")
    return f"{path}:{value:g}"


def control_spec(text) -> str:
    """'KIND:PATH[:SCALE]' with KIND canny (edges computed from PATH), depth (PATH is the map) or inpaint."""
    kind, sep, rest = str(text).partition(":")
    if not sep or kind not in CONTROL_KINDS or not rest:
        raise argparse.ArgumentTypeError(f"expected KIND:PATH[:SCALE] with KIND one of {', '.join(CONTROL_KINDS)}, "
                                         f"got {text!r}")
    path, _, scale = rest.rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        path, value = rest, 1.0
    return f"{kind}:{path}:{value:g}"


def cache_spec(text: str) -> str:
    """A step-cache preset or METHOD:FIELD=VALUE,... (qistudio/caching/config.py), returned in its full form."""
    try:
        return setting_text(parse_setting(str(text)))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' (or 'N' for a square) -> (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+)\s*)?", str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1328x1328, got {text!r}")
    width, height = int(match[1]), int(match[2] or match[1])
    if not (16 <= width <= 16384 and 16 <= height <= 16384):
        raise argparse.ArgumentTypeError(f"width and height must be in [16, 16384], got {width}x{height}")
    return width, height


# What a PNG stores, and how each stored value is read back (the same checks as the flags).
STORED = {
    "prompt": str, "negative": str, "seed": seed_int, "steps": positive_int, "cfg": finite_float, "size": parse_size,
    "model": str, "demo": bool, "input_image": str, "strength": strength_float, "dtype": str, "tiled": bool,
    "edit_images": lambda paths: [str(p) for p in paths], "loras": lambda specs: [lora_spec(s) for s in specs],
    "scheduler": str, "entities": lambda items: [str(e) for e in items],
    "entity_masks": lambda paths: [str(p) for p in paths], "controls": lambda specs: [control_spec(c) for c in specs],
    "inpaint_mask": str, "context_image": str, "controlnets": lambda specs: [str(c) for c in specs],
    "cache": cache_spec, "text_encoder": lambda paths: [existing_file(p) for p in paths],
}  # fmt: skip
CONTROL_KINDS = {"canny": "Canny", "depth": "Depth", "inpaint": "Inpaint"}  # -> DiffSynth-Studio repository suffix
SCHEDULERS = ("Qwen-Image", "Qwen-Image-Lightning")  # FlowMatchScheduler.TEMPLATES


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="make an image from a prompt", description="Make an image from a prompt (text-to-image), "
        "or from a prompt and an input image (image-to-image). The PNG carries the parameters that made it.",
    )  # fmt: skip
    p.add_argument("prompt", nargs="?", help="what to draw (optional with --from-png)")
    p.add_argument("-o", "--output", default="image.png", help="PNG to write (default: image.png)")
    p.add_argument("--model", help=f"hub id or local folder (default: {HUB_MODEL}), or a DiT file (.gguf, NF4 "
                   f".safetensors) with the rest of {HUB_MODEL} (--model-dir, --skip-download apply)")
    p.add_argument("--text-encoder", metavar="FILE", action="append", dest="text_encoder", type=existing_file,
                   help="take the text encoder from this file instead (llama.cpp's Qwen2.5-VL GGUF, as ComfyUI users "
                   "have it); repeat for its mmproj GGUF (the vision tower, which edits need)")
    p.add_argument("--demo", action="store_true", default=None,
                   help="use a tiny random model (built offline in seconds, cached in ~/.cache/qistudio/demo)")
    p.add_argument("--negative", help="negative prompt (default: empty)")
    p.add_argument("--steps", type=positive_int,
                   help=f"denoising steps (default: {FULL_STEPS}; {DEMO_STEPS} with --demo)")
    p.add_argument("--cfg", type=finite_float, help="classifier-free guidance scale (default: 4.0; 1 turns it off)")
    p.add_argument("--seed", type=seed_int, help="random seed (default: random; printed and stored in the PNG)")
    p.add_argument("--size", type=parse_size, metavar="WxH",
                   help="image size (default: 1328x1328; the input image's size with --input-image; "
                   "256x256 with --demo)")
    p.add_argument("--input-image", metavar="PATH", help="start from this image (image-to-image)")
    p.add_argument("--edit-image", metavar="PATH", action="append", dest="edit_images",
                   help="edit this image (repeat for several: Edit-2509/2511); the output keeps the last image's "
                   f"aspect ratio unless --size is given (default model: {HUB_EDIT_MODEL})")
    p.add_argument("--lora", metavar="PATH[:SCALE]", action="append", dest="loras", type=lora_spec,
                   help="apply a LoRA (any common format; repeat to stack them), at SCALE (default 1)")
    p.add_argument("--scheduler", choices=SCHEDULERS,
                   help="sigma schedule: Qwen-Image (default) or Qwen-Image-Lightning (for the 4/8-step Lightning "
                   "LoRAs, with --steps 4 or 8 --cfg 1)")
    p.add_argument("--entity", metavar="PROMPT", action="append", dest="entities",
                   help="EliGen: a prompt for one region (repeat; pair each with --entity-mask, in order)")
    p.add_argument("--entity-mask", metavar="PATH", action="append", dest="entity_masks",
                   help="EliGen: the region of the matching --entity (white = inside; any size)")
    p.add_argument("--control", metavar="KIND:PATH[:SCALE]", action="append", dest="controls", type=control_spec,
                   help="Blockwise ControlNet: canny (edges computed from the image), depth (a depth map) or inpaint "
                   "(the image; needs --inpaint-mask); repeatable")
    p.add_argument("--controlnet", metavar="KIND=SOURCE", action="append", dest="controlnets",
                   help="where a ControlNet's weights come from (a file, folder or hub id; default "
                   "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-<Kind>)")
    p.add_argument("--inpaint-mask", metavar="PATH", help="white = repaint; with --input-image the rest is kept")
    p.add_argument("--context-image", metavar="PATH",
                   help="In-Context control map (with the In-Context-Control-Union LoRA via --lora)")
    p.add_argument("--strength", type=strength_float,
                   help=f"how much of the input image to repaint, in (0, 1] (default: {IMG2IMG_STRENGTH})")
    p.add_argument("--device", help="cuda, cuda:1, cpu... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--tiled", action="store_true", default=None,
                   help="encode and decode the VAE in tiles (less memory)")
    p.add_argument("--download-source", choices=DOWNLOAD_SOURCES,
                   help="hub to download from (default: $QISTUDIO_DOWNLOAD_SOURCE or modelscope)")
    p.add_argument("--model-dir", metavar="DIR",
                   help="where downloads go (default: $QISTUDIO_MODEL_BASE_PATH or ./models)")
    p.add_argument("--skip-download", action="store_true", default=None,
                   help="use the files under --model-dir as they are; never contact the hub")
    p.add_argument("--from-png", metavar="PNG", help="reuse the parameters stored in a PNG made by qistudio; "
                   "flags given explicitly override them")  # fmt: skip
    p.add_argument("--cache", type=cache_spec, metavar="PRESET|METHOD:FIELD=VALUE,...",
                   help=f"skip DiT work on steps that change little: {', '.join(PRESETS)}, or e.g. "
                        "dbcache:front_blocks=1,residual_diff_threshold=0.12 (methods first-block, dbcache, "
                        "taylorseer, fixed; default: off)")
    add_speed_arguments(p)
    add_parallel_argument(p)
    p.set_defaults(run=run, parser=p)
    return p


def resolve_settings(args: argparse.Namespace) -> dict:
    """The full set of generation settings: defaults < --from-png < explicit flags. Errors via parser.error."""
    error = args.parser.error
    stored = {}
    if args.from_png:
        from ..imageio import read_png_parameters

        try:
            raw = read_png_parameters(args.from_png)
            stored = {key: STORED[key](value) for key, value in raw.items() if key in STORED and value is not None}
        except (OSError, ValueError, argparse.ArgumentTypeError) as e:
            error(f"--from-png {args.from_png}: {e}")
    explicit = {key: getattr(args, key) for key in STORED if getattr(args, key, None) is not None}
    if explicit.get("demo") and "model" in explicit:
        error("give --demo or --model, not both")
    if "model" in explicit:
        stored.pop("demo", None)  # an explicit model replaces a stored demo
    if "demo" in explicit:
        stored.pop("model", None)
    if "model" in explicit or "demo" in explicit:
        stored.pop("text_encoder", None)  # a stored text encoder goes with the stored model
    settings = {**DEFAULTS, **stored, **explicit}
    qwen21_settings(settings, {*stored, *explicit}, error)  # Qwen-Image 2.1's defaults and refusals
    if settings.get("text_encoder"):  # the files' family against the model's (headers only)
        check_text_encoder(settings, error)
    if not settings.get("prompt"):
        error("a prompt is needed: qistudio generate \"a cat on a sofa\" (or --from-png old.png)")
    if settings.get("input_image"):
        try:
            settings["image"] = _read_image(settings["input_image"])
        except ValueError as e:
            error(f"input image: {e}")
        settings["input_image"] = str(Path(settings["input_image"]).expanduser().resolve())
        settings.setdefault("strength", IMG2IMG_STRENGTH)
    elif settings.get("strength", 1.0) != 1.0:
        error("--strength needs --input-image (image-to-image)")
    demo = settings["demo"]
    for spec in settings.get("loras") or []:
        path = Path(spec.rpartition(":")[0]).expanduser()
        if not path.exists():
            error(f"--lora {spec}: no such file or folder {path}")
    settings["loras"] = [f"{Path(s.rpartition(':')[0]).expanduser().resolve()}:{s.rpartition(':')[2]}"
                         for s in settings.get("loras") or []] or None
    entities, masks = settings.get("entities") or [], settings.get("entity_masks") or []
    if len(entities) != len(masks):
        error(f"{len(entities)} --entity prompts but {len(masks)} --entity-mask files; give one mask per entity")
    if masks:
        try:
            settings["entity_images"] = [_read_mask(path) for path in masks]
        except ValueError as e:
            error(f"entity mask: {e}")
        settings["entity_masks"] = [str(Path(path).expanduser().resolve()) for path in masks]
        if settings.get("edit_images"):
            error("--entity cannot be combined with --edit-image")
    _resolve_controls(settings, error)
    if settings.get("edit_images"):
        try:
            settings["edit"] = [_read_image(path) for path in settings["edit_images"]]
        except ValueError as e:
            error(f"edit image: {e}")
        settings["edit_images"] = [str(Path(path).expanduser().resolve()) for path in settings["edit_images"]]
        if demo and "size" not in settings:  # the demo's small working area, with the edit image's aspect
            from ..conditioning.edit import EditRow, size_at_area

            settings["size"] = size_at_area(DEMO_SIZE[0] * DEMO_SIZE[1], EditRow(settings["edit"], False).aspect)
    image_size = settings["image"].size if "image" in settings else FULL_SIZE
    if "edit" not in settings:
        settings.setdefault("size", DEMO_SIZE if demo else image_size)
    settings.setdefault("steps", DEMO_STEPS if demo else FULL_STEPS)
    settings.setdefault("strength", 1.0)
    settings.setdefault("model", None if demo else HUB_EDIT_MODEL if "edit" in settings else HUB_MODEL)
    if settings.get("size") is not None:
        settings["size"] = _rounded(*settings["size"])
    if settings.get("entity_images"):
        from ..conditioning.eligen import entity_control

        width, height = settings["size"]
        try:  # the same checks the pipeline makes (an empty region, too many), before any model loads
            entity_control(settings["entities"], settings["entity_images"], False, height // 8, width // 8)
        except ValueError as e:
            error(str(e))
    resolve_device(settings, args.device, error)
    if settings.get("seed") is None:
        settings["seed"] = random.randrange(2**31)
    return settings


def check_output(output: str, error) -> Path:
    """The -o path, or `error` naming what is wrong with it: checked first, before anything is read or loaded."""
    path = Path(output).expanduser()
    if path.suffix.lower() != ".png":
        error(f"-o {output}: the output must be a .png (it carries the generation parameters)")
    if path.is_dir():
        error(f"-o {output}: is a folder; give a file name such as {path / 'image.png'}")
    reason = unwritable_folder_reason(path.absolute().parent)
    if reason:
        error(f"-o {output}: {reason}")
    return path


def _read_image(path):
    from ..imageio import load_image

    return load_image(path)


def _read_mask(path):
    # Masks keep black where they are transparent (a picture would be flattened on white: the whole mask white).
    from ..imageio import load_mask

    return load_mask(path)


def _resolve_controls(settings: dict, error) -> None:
    """Read the control, mask and context images (errors before loading); paths stored absolute."""
    for key in ("inpaint_mask", "context_image"):
        if settings.get(key):
            try:
                settings[key + "_data"] = (_read_mask if key == "inpaint_mask" else _read_image)(settings[key])
            except ValueError as e:
                error(f"--{key.replace('_', '-')}: {e}")
            settings[key] = str(Path(settings[key]).expanduser().resolve())
    controls = []
    for spec in settings.get("controls") or []:
        kind, path, scale = spec.split(":")[0], ":".join(spec.split(":")[1:-1]), float(spec.split(":")[-1])
        try:
            image = _read_image(path)
        except ValueError as e:
            error(f"--control {spec}: {e}")
        if kind == "inpaint" and "inpaint_mask_data" not in settings:
            error("--control inpaint needs --inpaint-mask (white = repaint)")
        controls.append((kind, str(Path(path).expanduser().resolve()), scale, image))
    settings["control_data"] = controls
    if controls:
        settings["controls"] = [f"{k}:{p}:{s:g}" for k, p, s, _ in controls]
    sources = dict(item.split("=", 1) for item in settings.get("controlnets") or [] if "=" in item)
    bad = [item for item in settings.get("controlnets") or [] if "=" not in item or item.split("=")[0] not in CONTROL_KINDS]
    if bad:
        error(f"--controlnet {bad[0]}: expected KIND=SOURCE with KIND one of {', '.join(CONTROL_KINDS)}")
    settings["controlnet_sources"] = sources


def control_inputs(settings: dict, kinds: list[str]) -> list:
    """ControlNetInputs for the pipeline; controlnet_id = the kind's position among the loaded ControlNets."""
    from ..annotators import canny
    from ..conditioning.control import ControlNetInput

    inputs = []
    for kind, _, scale, image in settings.get("control_data") or []:
        mask = settings.get("inpaint_mask_data") if kind == "inpaint" else None
        inputs.append(ControlNetInput(image=canny(image) if kind == "canny" else image, scale=scale,
                                      controlnet_id=kinds.index(kind), inpaint_mask=mask))
    return inputs


def controlnet_configs(settings: dict, args: argparse.Namespace) -> tuple[list[ModelConfig], list[str]]:
    """One ModelConfig per control kind used, in first-use order (their controlnet_ids)."""
    from ..weights.model_config import ModelConfig

    kinds = list(dict.fromkeys(kind for kind, *_ in settings.get("control_data") or []))
    configs = []
    for kind in kinds:
        source = settings["controlnet_sources"].get(kind)
        if source and Path(source).expanduser().exists():
            configs.append(ModelConfig(path=str(Path(source).expanduser().resolve())))
        else:
            configs.append(ModelConfig(
                model_id=source or f"DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-{CONTROL_KINDS[kind]}",
                origin_file_pattern="model.safetensors", download_source=args.download_source,
                local_model_path=args.model_dir, skip_download=args.skip_download,
            ))  # fmt: skip
    return configs, kinds


def _rounded(width: int, height: int) -> tuple[int, int]:
    from ..imageio import round_size

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        height16, width16 = round_size(height, width)
    if (width16, height16) != (width, height):
        print(f"note: size {width}x{height} is not a multiple of 16; using {width16}x{height16}", file=sys.stderr)
    return width16, height16


def resolve_device(settings: dict, device: str | None, error) -> None:
    import torch

    from ..pipeline import default_device

    try:
        settings["device"] = str(torch.device(device or default_device()))
    except RuntimeError as e:
        error(f"--device {device}: {e}")
    if settings["device"].startswith("cuda") and not torch.cuda.is_available():
        error(f"--device {device}: no CUDA device is available here; use --device cpu")
    settings.setdefault("dtype", "bfloat16" if settings["device"].startswith("cuda") else "float32")
    if settings["dtype"] not in DTYPES:
        error(f"dtype {settings['dtype']!r} is not one of {', '.join(sorted(DTYPES))}")


def model_configs(settings: dict, args: argparse.Namespace) -> tuple[list[ModelConfig], ModelConfig, ModelConfig | None]:
    """The three ModelConfigs, the tokenizer's and the processor's (edits only), for the demo, a folder or a hub id."""
    from ..demo import default_demo_dir, write_demo_model
    from ..weights.model_config import ModelConfig

    if settings["demo"]:
        return _folder_configs(write_demo_model(default_demo_dir()))
    model = settings["model"]
    if is_qwen21_model(model):  # processor/, no tokenizer/ (generate21.py)
        return qwen21_model_configs(model, args)
    folder = Path(model).expanduser()
    if folder.is_file():  # one DiT file (a GGUF, an NF4 safetensors): the rest from the base model, as given
        base = model_configs({**settings, "model": HUB_EDIT_MODEL if settings.get("edit") else HUB_MODEL}, args)
        return [ModelConfig(path=str(folder.resolve())), *base[0][1:]], base[1], base[2]
    if folder.is_dir():
        missing = [name + "/" for name in SUBFOLDERS if not (folder / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"--model {model}: the folder has no {', '.join(missing)}")
        return _folder_configs(folder.resolve())
    if folder.exists() or model.startswith((".", "~", "/")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise FileNotFoundError(f"--model {model}: no such model folder, and not a hub id like {HUB_MODEL}")
    hub = dict(model_id=model, download_source=args.download_source, local_model_path=args.model_dir,
               skip_download=args.skip_download)  # fmt: skip
    configs = [ModelConfig(origin_file_pattern=pattern, **hub) for pattern in HUB_PATTERNS]
    processor = ModelConfig(origin_file_pattern="processor/", **hub) if settings.get("edit") else None
    return configs, ModelConfig(origin_file_pattern="tokenizer/", **hub), processor


def _folder_configs(folder: Path) -> tuple[list[ModelConfig], ModelConfig, ModelConfig | None]:
    from ..weights.model_config import ModelConfig

    configs = [ModelConfig(path=str(folder / name)) for name in SUBFOLDERS[:3]]
    # Without processor/ the pipeline builds Qwen2.5-VL's processor from the tokenizer.
    processor = ModelConfig(path=str(folder / "processor")) if (folder / "processor").is_dir() else None
    return configs, ModelConfig(path=str(folder / "tokenizer")), processor


def uses_picture_template(settings: dict) -> bool:
    """Whether the model reads edit images as "Picture k: ..." (Edit-2509/2511), so a single one goes in a list."""
    if len(settings["edit"]) > 1:
        return True
    model = settings.get("model")
    if model in PICTURE_TEMPLATE_MODELS:
        return True
    index = Path(model).expanduser() / "model_index.json" if model else None
    if index is None or not index.is_file():
        return False
    from ..weights.jsonfile import read_json

    return read_json(index).get("_class_name") in PICTURE_TEMPLATE_PIPELINES  # bad JSON: one error naming the file


def load_pipeline(settings: dict, args: argparse.Namespace) -> QwenImagePipeline | None:
    """The pipeline, or None after printing one message saying what failed and where weights could come from."""
    import torch

    from ..demo import default_demo_dir, is_complete_demo
    from ..pipeline import QwenImagePipeline
    from ..weights.errors import CheckpointError
    from ..weights.hub import DownloadError

    what = "the demo model" if settings["demo"] else f"the model {settings['model']!r}"
    print(f"loading {what} on {settings['device']} ({settings['dtype']})", file=sys.stderr)
    try:
        configs, tokenizer_config, processor_config = base_model_configs(settings, args)
        configs = configs + controlnet_configs(settings, args)[0]
        return QwenImagePipeline.from_pretrained(
            torch_dtype=getattr(torch, settings["dtype"]), device=settings["device"],
            model_configs=configs, tokenizer_config=tokenizer_config, processor_config=processor_config,
        )  # fmt: skip
    except (DownloadError, CheckpointError, OSError, ModuleNotFoundError) as e:
        reason = str(e).splitlines()[0] if isinstance(e, DownloadError) else str(e)
        hint = f"\n{LAYOUT_HINT}"
        if settings["demo"]:
            hint = f"\nDelete {default_demo_dir()} to rebuild it." if is_complete_demo(default_demo_dir()) else ""
        print(f"qistudio generate: could not load {what}: {reason}{hint}", file=sys.stderr)
        return None


def base_model_configs(settings: dict, args: argparse.Namespace):
    """model_configs with --text-encoder's files in place of the model's text encoder (configs[1] in both families,
    checked by check_text_encoder), resting in host memory under --vram-limit (the plan moves them in: loaded
    onto the GPU first, they would need all of its memory once)."""
    configs, tokenizer_config, processor_config = model_configs(settings, args)
    if settings.get("text_encoder"):
        configs[1] = type(configs[1])(path=settings["text_encoder"])
    if getattr(args, "vram_limit", None) is not None:
        configs = [dataclasses.replace(config, offload_device=config.offload_device or "cpu") for config in configs]
    return configs, tokenizer_config, processor_config


def png_parameters(settings: dict, image) -> dict:
    width, height = image.size
    stored = {key: settings.get(key) for key in STORED}
    return {**stored, "size": f"{width}x{height}", "device": settings["device"], "qistudio": __version__}


def run(args: argparse.Namespace) -> int:
    output = check_output(args.output, args.parser.error)
    settings = resolve_settings(args)
    check_speed_arguments(args, args.parser.error)
    ranks = start_parallel(args, settings)  # --parallel: starts the ranks here and waits; under torchrun: joins
    if ranks.exit_code is not None:
        return ranks.exit_code
    print(f"seed: {settings['seed']}")
    pipe = load_pipeline(settings, args)
    if pipe is None:
        return 1
    ranks.enable(pipe)
    apply_before_loras(pipe, args)
    width, height = settings.get("size") or (None, None)  # None: the pipeline sizes an edit by its image
    edit_image = None
    if settings.get("edit"):
        edit_image = settings["edit"] if uses_picture_template(settings) else settings["edit"][0]
    try:
        for spec in settings.get("loras") or []:
            path, _, scale = spec.rpartition(":")
            pipe.load_lora(pipe.dit, path, alpha=float(scale))
    except (ValueError, OSError) as e:
        print(f"qistudio generate: could not apply LoRA: {e}", file=sys.stderr)
        return 1
    if settings.get("scheduler"):
        from ..sampling.schedule import FlowMatchScheduler

        pipe.scheduler = FlowMatchScheduler(settings["scheduler"])
    apply_after_loras(pipe, args)
    image = pipe_call(pipe, settings)(
        settings["prompt"], negative_prompt=settings["negative"], cfg_scale=settings["cfg"],
        input_image=settings.get("image"), denoising_strength=settings["strength"], height=height, width=width,
        edit_image=edit_image, eligen_entity_prompts=settings.get("entities") or None,
        eligen_entity_masks=settings.get("entity_images"), inpaint_mask=settings.get("inpaint_mask_data") if settings.get("image") or settings.get("edit") else None,
        context_image=settings.get("context_image_data"),
        blockwise_controlnet_inputs=control_inputs(settings, controlnet_configs(settings, args)[1]),
        seed=settings["seed"], num_inference_steps=settings["steps"], tiled=settings["tiled"],
        progress_bar_cmd=lambda steps: tqdm(steps, desc="denoising", unit="step"), cache=settings.get("cache"),
    )  # fmt: skip
    if image is None:  # a parallel run's other ranks: rank 0 writes the PNG
        return 0
    from ..imageio import save_png

    parameters = png_parameters(settings, image)
    if pipe.last_cache_report is not None:  # per guidance branch, the steps that ran the DiT in full
        parameters["cache_computed_steps"] = pipe.last_cache_report["computed_steps"]
    path = save_png(image, output, parameters)
    print(f"saved {path} ({image.width}x{image.height}, seed {settings['seed']})")
    return 0
