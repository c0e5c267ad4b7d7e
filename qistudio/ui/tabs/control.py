"""The Control tab: In-Context control from a map (uploaded, or Canny edges computed from a picture)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .. import forms
from .common import RunPanel, SettingsPanel, Shared, run_panel, settings_panel, wire_run

IN_CONTEXT_NOTE = (
    "In-Context control reads the map as an extra image through the **In-Context-Control-Union** LoRA "
    "(DiffSynth-Studio/Qwen-Image-In-Context-Control-Union): put it in a --lora-dir folder and add it in the LoRA "
    "tab. Canny edges are computed here; depth, pose and other maps are uploaded as they are.")
BLOCKWISE_NOTE = (
    "**Blockwise ControlNet** (canny, depth, inpaint) runs from `qistudio generate --control KIND:IMAGE`; the engine "
    "that the UI and the server share does not take ControlNet inputs yet, so it is not offered here.")


@dataclass
class ControlTab:
    source: gr.Image
    control_map: gr.Image
    prompt: gr.Textbox
    settings: SettingsPanel
    panel: RunPanel


def canny_map(image, low, high):
    from ...annotators import canny

    if image is None:
        raise gr.Error("upload a picture to compute its edges from", print_exception=False)
    try:
        return canny(image, int(low), int(high))
    except (ImportError, ValueError) as error:
        raise gr.Error(str(error), print_exception=False) from None


def build(ctx, shared: Shared) -> ControlTab:
    with gr.Tab("Control", id="control"):
        gr.Markdown(IN_CONTEXT_NOTE)
        with gr.Row():
            source = gr.Image(label="Picture (for Canny edges)", type="pil", format="png", sources=["upload", "clipboard"],
                              height=240, elem_id="control-source")
            control_map = gr.Image(label="Control map", type="pil", format="png", sources=["upload", "clipboard"], height=240,
                                   elem_id="control-map")
        with gr.Row():
            low = gr.Slider(0, 255, 100, step=1, label="Canny low threshold", elem_id="control-low")
            high = gr.Slider(0, 255, 200, step=1, label="Canny high threshold", elem_id="control-high")
            compute = gr.Button("Compute Canny edges", elem_id="control-canny")
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="control-prompt")
        settings = settings_panel(ctx, "control")
        panel = run_panel("control", shared)
        gr.Markdown(BLOCKWISE_NOTE)
    compute.click(canny_map, inputs=[source, low, high], outputs=control_map)
    wire_run(ctx, "control", panel, {control_map, prompt, shared.loras, *settings.components()},
             lambda data: forms.in_context(data[prompt], settings.values(data), data[control_map],
                                           data[shared.loras]))
    return ControlTab(source, control_map, prompt, settings, panel)
