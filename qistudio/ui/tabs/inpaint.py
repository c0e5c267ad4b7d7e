"""The Inpaint & image-to-image tab: paint the region to repaint on the picture (nothing painted: the whole
picture is redrawn, image-to-image), and how strongly."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .. import forms
from .common import RunPanel, SettingsPanel, Shared, run_panel, settings_panel, wire_run

BRUSH_SIZE = 16  # radius in pixels of the picture; the editor's brush-size control changes it


@dataclass
class InpaintTab:
    editor: gr.ImageEditor
    prompt: gr.Textbox
    strength: gr.Slider
    settings: SettingsPanel
    panel: RunPanel


def build(ctx, shared: Shared) -> InpaintTab:
    with gr.Tab("Inpaint & image-to-image", id="inpaint"):
        gr.Markdown("Upload a picture, then paint over what to repaint with the brush. Leave it unpainted to "
                    "redraw the whole picture (image-to-image).")
        editor = gr.ImageEditor(label="Picture and mask", type="pil", format="png", layers=False,
                                sources=["upload", "clipboard"], transforms=(), height=420, elem_id="inpaint-editor",
                                brush=gr.Brush(default_size=BRUSH_SIZE, colors=["#ffffff"], default_color="#ffffff",
                                               color_mode="fixed"))
        prompt = gr.Textbox(label="Prompt", lines=2, placeholder="what the repainted picture shows",
                            elem_id="inpaint-prompt")
        strength = gr.Slider(0.05, 1.0, 0.7, step=0.05, label="Strength (how much to repaint; 1 = ignore the "
                             "picture there)", elem_id="inpaint-strength")
        settings = settings_panel(ctx, "inpaint", follow_input=True)
        panel = run_panel("inpaint", shared, "Repaint")
    wire_run(ctx, "inpaint", panel, {editor, prompt, strength, shared.loras, *settings.components()},
             lambda data: forms.inpaint(data[prompt], settings.values(data), data[editor], data[strength],
                                        data[shared.loras]))
    return InpaintTab(editor, prompt, strength, settings, panel)
