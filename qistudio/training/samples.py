"""Validation images during training: the validation prompts rendered by the pipeline with the model as trained.

The pipeline (QwenImagePipeline around the trainer's own components) runs the DiT being trained, its LoRA layers
included, with the run's validation settings and a fixed seed, so the images of successive steps differ only by
what was learned. A run with extra inputs (edit, context, ControlNet, EliGen) renders every prompt with the
conditions of its first readable sample (Qwen-Image-Layered: that sample's input image split into as many layers as
it has, each layer saved as NN-layer-K.png; Qwen-Image 2.1: its edit images, through 2.1's pipeline, RGBA). The
models are put in eval mode for it and every module gets its mode back afterwards; a text
encoder and VAE that the sample cache moved to host memory come onto the device for the rendering only. Images go
to output_path/samples/step-N/NN.png with their parameters in the PNG (as `qistudio validate` writes them).
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch
from PIL import Image

from ..components import Components
from ..imageio import save_png
from ..pipeline import QwenImagePipeline
from ..pipeline21 import pipeline_class
from .config import TrainConfig

SAMPLES = "samples"


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.train(training)


@contextlib.contextmanager
def on_device(components: Components, device):
    """The text encoder and VAE on `device` for the duration, back where they were after."""
    models = [m for m in (components.text_encoder, components.vae) if m is not None]
    homes = [next(m.parameters()).device for m in models]
    for m in models:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(models, homes):
            m.to(home)


def render_samples(components: Components, model: torch.nn.Module, config: TrainConfig, step: int, device,
                   dtype: torch.dtype, conditions: dict | None = None,
                   conditions_from: str | None = None) -> list[tuple[Path, Image.Image]]:
    """Render every validation prompt; `model` is the module that trains (put in eval mode meanwhile).
    `conditions`: the pipeline's keyword arguments for the extra inputs, taken from the sample `conditions_from`."""
    conditions = {k: v for k, v in (conditions or {}).items() if v is not None}
    width, height = config.validation_size
    folder = Path(config.output_path) / SAMPLES / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    pipe = pipeline_class(QwenImagePipeline, components)(components, device, dtype)  # 2.1's for a 2.1 DiT
    size = {} if "layers" in conditions else dict(height=height, width=width)  # Layered: the size follows resolution
    # Unset: the pipeline's own default guidance (Qwen-Image's 4.0; 2.1 samples without guidance).
    cfg_scale = config.validation_cfg_scale
    if cfg_scale is None:
        cfg_scale = inspect.signature(pipe.__call__).parameters["cfg_scale"].default
    written = []
    with eval_mode(model), on_device(components, device), torch.no_grad():
        for index, prompt in enumerate(config.validation_prompts):
            result = pipe(prompt, cfg_scale=cfg_scale, seed=config.validation_seed,
                          num_inference_steps=config.validation_num_inference_steps,
                          progress_bar_cmd=lambda steps: steps, **size, **conditions)
            images = result if isinstance(result, list) else [result]  # Layered: the layers, bottom first
            parameters = {"prompt": prompt, "seed": config.validation_seed,
                          "steps": config.validation_num_inference_steps, "cfg": cfg_scale,
                          "size": f"{images[0].width}x{images[0].height}", "training_step": step,
                          "output_path": config.output_path,
                          "trained": "lora" if config.is_lora else config.trainable_models}
            if conditions:
                parameters["conditions"] = f"{', '.join(sorted(conditions))} of {conditions_from}"
            for layer, image in enumerate(images, 1):
                name = f"{index:02d}.png" if len(images) == 1 and "layers" not in conditions else \
                    f"{index:02d}-layer-{layer}.png"
                written.append((save_png(image, folder / name, parameters), image))
    return written
