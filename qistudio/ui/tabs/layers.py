"""The Layers tab: a picture split into RGBA layers by Qwen-Image-Layered (the served model, or the one served
beside it), shown bottom layer first."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ...validation import InputError
from .. import forms
from ..forms import Settings
from .common import RunPanel, Shared, run_panel, wire_run

NOTE = (
    "Splits the picture into RGBA layers (bottom first; stacked in order they rebuild it) with "
    "**Qwen-Image-Layered**, at the picture's aspect ratio and about *resolution*² pixels. Without a prompt the "
    "text encoder first writes a caption of the picture.")
NOT_SERVED = ("This UI serves no Qwen-Image-Layered model: start it with `--layered-model Qwen/Qwen-Image-Layered` "
              "(or `--demo`).")
MAX_LAYERS = 8


@dataclass
class LayersTab:
    picture: gr.Image
    count: gr.Slider
    resolution: gr.Radio
    prompt: gr.Textbox
    english: gr.Checkbox
    negative: gr.Textbox
    steps: gr.Slider
    cfg: gr.Slider
    seed_mode: gr.Radio
    seed: gr.Number
    panel: RunPanel

    def job(self, data: dict, loras):
        seed = None
        if data[self.seed_mode] == "fixed":
            if data[self.seed] is None or data[self.seed] < 0:
                raise InputError(f"seed must be a whole number >= 0, got {data[self.seed]}")
            seed = int(data[self.seed])
        settings = Settings(negative_prompt=data[self.negative] or "", steps=int(data[self.steps]),
                            cfg_scale=float(data[self.cfg]), seed=seed)
        return forms.layers(data[self.prompt], settings, data[self.picture], data[self.count],
                            data[self.resolution], data[self.english], data[loras])


def served(spec) -> bool:
    return spec.family == "qwen-image-layered" or spec.layered is not None


def build(ctx, shared: Shared) -> LayersTab:
    with gr.Tab("Layers", id="layers"):
        gr.Markdown(NOTE if served(ctx.holder.spec) else NOTE + "\n\n" + NOT_SERVED)
        with gr.Row():
            picture = gr.Image(label="Picture", type="pil", image_mode="RGBA", format="png",
                               sources=["upload", "clipboard"], height=240, elem_id="layers-picture")
            with gr.Column():
                count = gr.Slider(1, MAX_LAYERS, 4, step=1, label="Layers", elem_id="layers-count")
                resolution = gr.Radio([640, 1024], value=640, label="Resolution", elem_id="layers-resolution")
                english = gr.Checkbox(label="Caption in English (when no prompt is given)", elem_id="layers-en")
        prompt = gr.Textbox(label="Prompt (optional: what the picture shows)", lines=2, elem_id="layers-prompt")
        with gr.Accordion("Settings", open=True):
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="layers-negative")
            with gr.Row():
                steps = gr.Slider(1, 200, ctx.default_steps, step=1, label="Steps", elem_id="layers-steps")
                cfg = gr.Slider(1.0, 10.0, 4.0, step=0.1, label="Guidance (1 = off)", elem_id="layers-cfg")
                seed_mode = gr.Radio(["random", "fixed"], value="random", label="Seed", elem_id="layers-seed-mode")
                seed = gr.Number(0, label="Seed value", precision=0, minimum=0, elem_id="layers-seed")
        panel = run_panel("layers", shared, label="Split into layers")
    tab = LayersTab(picture, count, resolution, prompt, english, negative, steps, cfg, seed_mode, seed, panel)
    wire_run(ctx, "layers", panel, {picture, count, resolution, prompt, english, negative, steps, cfg, seed_mode,
                                    seed, shared.loras}, lambda data: tab.job(data, shared.loras))
    return tab
