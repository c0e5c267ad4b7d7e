"""The loaded models of a pipeline, and how a list of ModelConfigs becomes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import filecmp
import functools
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from .models.dit import QwenImageDiT
from .models.text_encoder import QwenImageTextEncoder
from .models.vae import QwenImageVAE
from .tokenizer_build import QWEN25_IMAGE_PROCESSOR
from .memory.disk import DiskSource
from .weights.build import load_model, load_model_deferred
from .weights.errors import CheckpointError
from .weights.formats import CONTROLNET, DIT, TEXT_ENCODER, VAE, detect_layout
from .weights.hub import resolve_files
from .weights.jsonfile import read_json
from .weights.model_config import ModelConfig
from .weights.quantized_source import refuse_quantized_on_disk

_ATTRIBUTE = {DIT: "dit", VAE: "vae", TEXT_ENCODER: "text_encoder"}


@dataclass
class Components:
    dit: QwenImageDiT | None = None
    vae: QwenImageVAE | None = None
    text_encoder: QwenImageTextEncoder | None = None
    tokenizer: Any = None
    processor: Any = None
    controlnets: list = field(default_factory=list)
    # Where each model came from, for PNG metadata and error messages.
    sources: dict[str, str] = field(default_factory=dict)
    # Per model, where its ModelConfig says the weights rest between uses, and in which dtype.
    offload: dict[str, tuple[str | None, torch.dtype | None]] = field(default_factory=dict)
    memory: Any = None  # a memory.manager.MemoryManager once VRAM management is on
    # Models loaded with offload_device="disk": their block weights stay in the files (memory.disk.DiskSource).
    disk_sources: dict[str, Any] = field(default_factory=dict)
    # Per model, the checkpoint files it was read from (a caption reads the text encoder's unloaded lm_head there).
    files: dict[str, list] = field(default_factory=dict)

    def phase(self, phase: str, model_name: str):
        """Context in which `model_name` is on the device (a no-op without VRAM management)."""
        return self.memory.phase(phase, model_name) if self.memory is not None else nullcontext()

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self, n) for n in ("text_encoder", "dit", "vae") if getattr(self, n) is not None}

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            hint = {
                "dit": "transformer/diffusion_pytorch_model*.safetensors",
                "vae": "vae/diffusion_pytorch_model.safetensors",
                "text_encoder": "text_encoder/model*.safetensors",
                "tokenizer": "tokenizer/ (tokenizer_config=...)",
                "processor": "processor/ (processor_config=...)",
            }
            needed = "; ".join(f"{n}: {hint.get(n, n)}" for n in missing)
            raise ValueError(f"the pipeline has no {', '.join(missing)} loaded; add a ModelConfig for {needed}")


    def prompt_tokenizer(self):
        """The tokenizer for text prompts: the loaded one, else the processor's (the same Qwen2.5 tokenizer)."""
        if self.tokenizer is None and self.processor is not None:
            return self.processor.tokenizer
        self.require("tokenizer")
        return self.tokenizer

    def edit_processor(self):
        """The Qwen2.5-VL processor for edit images: the loaded one, else one built from the tokenizer.

        The built one uses Qwen2.5-VL's image settings, which Qwen/Qwen-Image-Edit's `processor/` folder holds,
        so an Edit model loaded without `processor_config` still edits as the reference does (said once).
        """
        if self.processor is None:
            self.require("tokenizer")
            warnings.warn("no processor_config was given; edit images use Qwen2.5-VL's image processor settings "
                          "with the loaded tokenizer (as in Qwen/Qwen-Image-Edit's processor/)", stacklevel=3)
            self.processor = default_processor(self.tokenizer)
        return self.processor


def default_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    settings = {k: v for k, v in QWEN25_IMAGE_PROCESSOR.items() if k not in ("image_processor_type", "processor_class")}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**settings), tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor()
    )


# The JSON files of a tokenizer or processor folder. The small ones (settings, where a NaN image mean would pass
# silently) are read strictly before loading; the large vocabularies (tokenizer.json is 11 MB, ~0.7 s to parse)
# only when loading failed, to name the bad file with its line and column instead of whatever transformers raises.
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "chat_template.json", "preprocessor_config.json", "processor_config.json",
                   "video_preprocessor_config.json")
_READ_FIRST_BYTES = 1 << 20


def _check_json_files(folder, everything: bool) -> None:
    for name in _TOKENIZER_JSON:
        path = folder / name
        if path.is_file() and (everything or path.stat().st_size <= _READ_FIRST_BYTES):
            read_json(path)


def _folder(config: ModelConfig) -> Path:
    folder = resolve_files(config)[0]
    return folder if folder.is_dir() else folder.parent


def _load_folder(folder: Path, what: str, loader):
    """`loader(folder)`; any failure of a bad folder is one CheckpointError."""
    _check_json_files(folder, everything=False)
    try:
        return loader(str(folder))
    except ImportError:
        raise  # a missing optional package: its own message says what to install
    except Exception as e:  # noqa: BLE001 - transformers and tokenizers raise many types for one cause: a bad folder
        _check_json_files(folder, everything=True)
        raise CheckpointError(f"{folder}: cannot load the {what} ({type(e).__name__}: {' '.join(str(e).split())})"
                              ) from None


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    return _load_folder(_folder(config), "tokenizer", AutoTokenizer.from_pretrained)


# The files transformers reads a tokenizer from. A processor folder holding the same bytes under the same names as
# the tokenizer folder holds the same tokenizer, so the processor takes the loaded one instead of parsing the 11 MB
# vocabulary a second time (~0.7 s a load); any difference, even in a setting, and it loads its own.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def same_tokenizer_files(folder: Path, other: Path) -> bool:
    for name in _TOKENIZER_FILES:
        path, other_path = folder / name, other / name
        if path.is_file() != other_path.is_file():
            return False
        if path.is_file() and not filecmp.cmp(path, other_path, shallow=False):
            return False
    return True


def load_processor(config: ModelConfig, tokenizer=None, tokenizer_config: ModelConfig | None = None):
    """The processor in `config`'s folder; `tokenizer` (loaded from `tokenizer_config`) is its tokenizer when the two
    folders hold the same tokenizer files."""
    from transformers import AutoProcessor

    folder = _folder(config)
    loader = AutoProcessor.from_pretrained
    if tokenizer is not None and same_tokenizer_files(_folder(tokenizer_config), folder):
        loader = functools.partial(AutoProcessor.from_pretrained, tokenizer=tokenizer)
    return _load_folder(folder, "processor", loader)


# Parameter-name prefixes of the blocks that stream from disk (the memory manager's streamable lists).
DISK_STREAMED_PREFIXES = ("transformer_blocks.", "model.language_model.layers.", "model.visual.blocks.")


def _streamed_from_disk(name: str) -> bool:
    return name.startswith(DISK_STREAMED_PREFIXES)


def detect_kind(files) -> str:
    from .weights.quantized_source import open_source  # every format, GGUF and bitsandbytes included

    source = open_source(files)
    try:
        return detect_layout(source.keys(), ", ".join(map(str, source.files))).kind
    finally:
        source.close()


def load_components(
    model_configs: list[ModelConfig],
    tokenizer_config: ModelConfig | None,
    processor_config: ModelConfig | None,
    dtype: torch.dtype,
    device: str | torch.device,
) -> Components:
    components = Components()
    # Resolve (download) every file first: a missing file fails before any weight is read.
    resolved = [(config, resolve_files(config)) for config in model_configs]
    for config, files in resolved:  # before any weight is read
        if str(config.offload_device) == "disk":
            refuse_quantized_on_disk(files)
    for config, files in resolved:
        # A model that rests off the device is built in host memory; the memory manager moves it. With
        # offload_device="disk" its repeated blocks are not even read: they stream from the files.
        device_here = "cpu" if config.offload_device else device
        controlnet = detect_kind(files) == CONTROLNET
        if controlnet:
            # Blockwise 1.1 B, InstantX Union 1.7 B parameters, needed at every step: not offloaded (yet), and
            # InstantX's own transformer_blocks are not streamed from disk either.
            device_here = device
        if str(config.offload_device) == "disk" and not controlnet:
            kind, model, deferred, source = load_model_deferred(files, dtype, device_here, defer=_streamed_from_disk)
            if deferred:
                components.disk_sources[_ATTRIBUTE[kind]] = DiskSource(source, deferred, dtype)
            else:
                source.close()
        else:
            kind, model = load_model(files, dtype=dtype, device=device_here)
        if kind == CONTROLNET:
            components.controlnets.append(model)
            continue
        attribute = _ATTRIBUTE[kind]
        if getattr(components, attribute) is not None:
            raise ValueError(
                f"two ModelConfigs hold a {attribute}: {components.sources[attribute]} and {config.description}"
            )
        setattr(components, attribute, model)
        components.sources[attribute] = config.model_id or str(files[0].parent)
        components.offload[attribute] = (config.offload_device, config.offload_dtype)
        components.files[attribute] = files
    if tokenizer_config is not None:
        components.tokenizer = load_tokenizer(tokenizer_config)
    if processor_config is not None:
        components.processor = load_processor(processor_config, components.tokenizer, tokenizer_config)
    return components
