"""The EliGen tab: paint each entity's region on a canvas in its own colour and describe it; the global prompt
describes the whole picture."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .. import forms, masks, sizes
from .common import RunPanel, SettingsPanel, Shared, run_panel, settings_panel, wire_run


@dataclass
class EliGenTab:
    editor: gr.ImageEditor
    prompt: gr.Textbox
    entities: dict  # colour name -> its prompt Textbox
    settings: SettingsPanel
    panel: RunPanel


def build(ctx, shared: Shared) -> EliGenTab:
    width, height = ctx.default_size
    with gr.Tab("EliGen", id="eligen"):
        gr.Markdown("Pick a colour, paint that entity's region, and describe it in the box of the same colour. "
                    "The canvas has the output size; make a new one after changing the size.")
        with gr.Row():
            with gr.Column(scale=3):
                editor = gr.ImageEditor(
                    masks.blank_canvas(width, height), label="Regions", type="pil", format="png", layers=False,
                    sources=(), transforms=(), height=420, elem_id="eligen-editor",
                    brush=gr.Brush(default_size=max(4, min(width, height) // 32),  # a radius, in canvas pixels
                                   colors=[hex_colour for _, hex_colour in masks.PALETTE],
                                   default_color=masks.PALETTE[0][1], color_mode="fixed"))
                new_canvas = gr.Button("New canvas at the chosen size", elem_id="eligen-new-canvas")
            with gr.Column(scale=2):
                entities = {name: gr.Textbox(label=f"{name} region", lines=1, elem_id=f"eligen-entity-{name}")
                            for name, _ in masks.PALETTE}
                on_negative = gr.Checkbox(False, label="Also apply the regions to the negative prompt",
                                          elem_id="eligen-on-negative")
        prompt = gr.Textbox(label="Global prompt", lines=2, placeholder="the whole picture", elem_id="eligen-prompt")
        settings = settings_panel(ctx, "eligen")
        panel = run_panel("eligen", shared)

    def blank(choice, width_value, height_value):
        size = sizes.chosen_size(choice, width_value or 0, height_value or 0, settings.table) or ctx.default_size
        return masks.blank_canvas(*size)

    # No progress overlay on the canvas: Gradio applies an event's status updates each after awaiting the editor's
    # get_data (network I/O), so a stale "processing" can land after "complete" and stay over the canvas, where it
    # swallows the user's strokes. The event is instant; there is nothing to show.
    new_canvas.click(blank, inputs=[settings.size, settings.width, settings.height], outputs=editor,
                     show_progress="hidden")
    wire_run(ctx, "eligen", panel, {editor, prompt, on_negative, shared.loras, *entities.values(),
                                    *settings.components()},
             lambda data: forms.eligen(data[prompt], settings.values(data), data[editor],
                                       {name: data[box] for name, box in entities.items()}, data[on_negative],
                                       data[shared.loras]))
    return EliGenTab(editor, prompt, entities, settings, panel)
