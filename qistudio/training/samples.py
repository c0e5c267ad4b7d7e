"""Validation images during training: the validation prompts rendered by the pipeline with the model as trained.

The pipeline (QwenImagePipeline around the trainer's own components) runs the DiT being trained, its LoRA layers
included, with the run's validation settings and a fixed seed, so the images of successive steps differ only by
what was learned. A run with extra inputs (edit, context, ControlNet, EliGen) renders every prompt with the
conditions of its first readable sample. The models are put in eval mode for it and every module gets its mode back afterwards; a text
encoder and VAE that the sample cache moved to host memory come onto the device for the rendering only. Images go
to output_path/samples/step-N/NN.png with their parameters in the PNG (as `qistudio validate` writes them).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from PIL import Image

from ..components import Components
from ..imageio import save_png
from ..pipeline import QwenImagePipeline
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
    pipe = QwenImagePipeline(components, device, dtype)
    written = []
    with eval_mode(model), on_device(components, device), torch.no_grad():
        for index, prompt in enumerate(config.validation_prompts):
            image = pipe(prompt, cfg_scale=config.validation_cfg_scale, height=height, width=width,
                         seed=config.validation_seed, num_inference_steps=config.validation_num_inference_steps,
                         progress_bar_cmd=lambda steps: steps, **conditions)
            parameters = {"prompt": prompt, "seed": config.validation_seed,
                          "steps": config.validation_num_inference_steps, "cfg": config.validation_cfg_scale,
                          "size": f"{width}x{height}", "training_step": step, "output_path": config.output_path,
                          "trained": "lora" if config.is_lora else config.trainable_models}
            if conditions:
                parameters["conditions"] = f"{', '.join(sorted(conditions))} of {conditions_from}"
            written.append((save_png(image, folder / f"{index:02d}.png", parameters), image))
    return written
