"""The Control tab: a control map (uploaded, or Canny edges computed from a picture) read by a Blockwise ControlNet
the engine serves (scale, start/end window), or by In-Context control (the In-Context-Control-Union LoRA)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .. import forms
from .common import RunPanel, SettingsPanel, Shared, run_panel, settings_panel, wire_run

IN_CONTEXT = "in-context"  # the "Control with" choice that is not a ControlNet
IN_CONTEXT_NOTE = (
    "In-Context control reads the map as an extra image through the **In-Context-Control-Union** LoRA "
    "(DiffSynth-Studio/Qwen-Image-In-Context-Control-Union): put it in a --lora-dir folder and add it in the LoRA "
    "tab. Canny edges are computed here; depth, pose and other maps are uploaded as they are.")
BLOCKWISE_NOTE = (
    "**Blockwise ControlNet** adds the map's residual after each DiT block, by *scale*, while the denoising "
    "progress (1 at the first step, 0 at the last) lies between *end* and *start*. The ControlNets offered are those "
    "the UI was started with (`--controlnet canny`, `--controlnet depth=PATH`, ...; `--demo` has a tiny canny one); "
    "the inpaint one repaints the white part of the repaint mask in the picture given as its map.")


@dataclass
class ControlTab:
    source: gr.Image
    control_map: gr.Image
    mask: gr.Image
    prompt: gr.Textbox
    method: gr.Dropdown
    scale: gr.Slider
    start: gr.Slider
    end: gr.Slider
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


def method_choices(names) -> list[tuple[str, str]]:
    """(label, value) of each way to read the map: the served ControlNets first, then In-Context control."""
    return [*((f"Blockwise ControlNet: {name}", name) for name in names),
            ("In-Context control (LoRA)", IN_CONTEXT)]


def job(data: dict, tab: ControlTab, loras):
    settings = tab.settings.values(data)
    if data[tab.method] == IN_CONTEXT:
        return forms.in_context(data[tab.prompt], settings, data[tab.control_map], data[loras])
    return forms.blockwise(data[tab.prompt], settings, data[tab.control_map], data[tab.method], data[tab.scale],
                           data[tab.start], data[tab.end], data[loras], data[tab.mask])


def build(ctx, shared: Shared) -> ControlTab:
    choices = method_choices(ctx.holder.spec.controlnet_names)
    with gr.Tab("Control", id="control"):
        with gr.Row():
            source = gr.Image(label="Picture (for Canny edges)", type="pil", format="png", sources=["upload", "clipboard"],
                              height=240, elem_id="control-source")
            control_map = gr.Image(label="Control map", type="pil", format="png", sources=["upload", "clipboard"], height=240,
                                   elem_id="control-map")
            mask = gr.Image(label="Repaint mask (inpaint ControlNet: white = repaint)", type="pil", format="png",
                            sources=["upload", "clipboard"], height=240, elem_id="control-mask")
        with gr.Row():
            low = gr.Slider(0, 255, 100, step=1, label="Canny low threshold", elem_id="control-low")
            high = gr.Slider(0, 255, 200, step=1, label="Canny high threshold", elem_id="control-high")
            compute = gr.Button("Compute Canny edges", elem_id="control-canny")
        with gr.Row():
            method = gr.Dropdown(choices, value=choices[0][1], label="Control with", elem_id="control-method")
            scale = gr.Slider(0.0, 2.0, 1.0, step=0.05, label="Scale", elem_id="control-scale")
            start = gr.Slider(0.0, 1.0, 1.0, step=0.05, label="Start (progress)", elem_id="control-start")
            end = gr.Slider(0.0, 1.0, 0.0, step=0.05, label="End (progress)", elem_id="control-end")
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="control-prompt")
        settings = settings_panel(ctx, "control")
        panel = run_panel("control", shared)
        gr.Markdown(BLOCKWISE_NOTE)
        gr.Markdown(IN_CONTEXT_NOTE)
    compute.click(canny_map, inputs=[source, low, high], outputs=control_map)
    tab = ControlTab(source, control_map, mask, prompt, method, scale, start, end, settings, panel)
    wire_run(ctx, "control", panel, {control_map, mask, prompt, method, scale, start, end, shared.loras,
                                     *settings.components()}, lambda data: job(data, tab, shared.loras))
    return tab
