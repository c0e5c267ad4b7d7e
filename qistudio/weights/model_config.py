"""Where one model's weights come from: the seed's `ModelConfig`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

DOWNLOAD_SOURCE_ENV = "QISTUDIO_DOWNLOAD_SOURCE"
MODEL_BASE_PATH_ENV = "QISTUDIO_MODEL_BASE_PATH"
SKIP_DOWNLOAD_ENV = "QISTUDIO_SKIP_DOWNLOAD"
DOWNLOAD_SOURCES = ("modelscope", "huggingface")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class ModelConfig:
    """A local path (or list of shard paths), or a hub id plus a file pattern inside that repository.

    `origin_file_pattern` is a glob relative to the repository root (`transformer/diffusion_pytorch_model*.safetensors`)
    or a folder ending in "/" (`tokenizer/`), which selects everything below it. Downloads land in
    `local_model_path/model_id/...`. `download_source` is "modelscope" (default, as in the seed) or
    "huggingface"; the environment variable QISTUDIO_DOWNLOAD_SOURCE (or DiffSynth's DIFFSYNTH_DOWNLOAD_SOURCE)
    sets the default. `offload_device`/`offload_dtype` say where the weights rest between uses (see
    `QwenImagePipeline.enable_vram_management`).
    """

    path: str | list[str] | None = None
    model_id: str | None = None
    origin_file_pattern: str | list[str] | None = None
    download_source: str | None = None
    local_model_path: str | None = None
    skip_download: bool | None = None
    offload_device: str | torch.device | None = None
    offload_dtype: torch.dtype | None = None
    # Filled in by resolve(): the local files this config stands for.
    resolved: list[Path] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.path is None and self.model_id is None:
            raise ValueError("ModelConfig needs either path=... (local files) or model_id=... (a hub repository)")
        if self.path is not None and self.model_id is not None:
            raise ValueError(
                f"ModelConfig got both path={self.path!r} and model_id={self.model_id!r}; give one of them"
            )
        if self.model_id is not None:
            parts = self.model_id.split("/") if isinstance(self.model_id, str) else []
            if not 1 <= len(parts) <= 2 or "\\" in self.model_id or any(p in ("", ".", "..") for p in parts):
                # It becomes a folder under local_model_path: "../x" would download outside it.
                raise ValueError(f"model_id={self.model_id!r} is not a hub repository id such as 'Qwen/Qwen-Image'")
        if self.download_source is None:
            env = os.environ.get(DOWNLOAD_SOURCE_ENV) or os.environ.get("DIFFSYNTH_DOWNLOAD_SOURCE") or "modelscope"
            self.download_source = env
        self.download_source = self.download_source.strip().lower().replace("_", "")
        if self.download_source in ("hf", "huggingfacehub"):
            self.download_source = "huggingface"
        if self.download_source not in DOWNLOAD_SOURCES:
            raise ValueError(
                f"download_source={self.download_source!r} is not known; use one of {', '.join(DOWNLOAD_SOURCES)}"
            )
        if self.local_model_path is None:
            self.local_model_path = (
                os.environ.get(MODEL_BASE_PATH_ENV) or os.environ.get("DIFFSYNTH_MODEL_BASE_PATH") or "./models"
            )
        if self.skip_download is None:
            self.skip_download = _env_flag(SKIP_DOWNLOAD_ENV) or _env_flag("DIFFSYNTH_SKIP_DOWNLOAD")
        if self.offload_device is not None and str(self.offload_device) not in ("cpu", "disk") and not str(
            self.offload_device
        ).startswith("cuda"):
            raise ValueError(f"offload_device={self.offload_device!r}: use 'cpu', 'disk' or a CUDA device")

    @property
    def description(self) -> str:
        if self.path is not None:
            return f"path={self.path!r}"
        return f"model_id={self.model_id!r}, origin_file_pattern={self.origin_file_pattern!r}"
