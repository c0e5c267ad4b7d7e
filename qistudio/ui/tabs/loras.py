"""The LoRA tab: pick LoRAs from the folders named at start-up (--lora-dir) and stack them with scales; every
tab's runs use the stack."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .common import Shared

HEADERS = ["LoRA", "scale"]


@dataclass
class LoRATab:
    choice: gr.Dropdown
    scale: gr.Slider
    add: gr.Button


def stack_table() -> gr.Dataframe:
    """The LoRA stack, made unrendered (every tab reads it; the LoRA tab shows it)."""
    return gr.Dataframe(headers=HEADERS, datatype=["str", "number"], type="array", interactive=True,
                        column_count=2, row_count=0, label="LoRA stack (applies to every tab's runs)",
                        elem_id="lora-stack", render=False)


def build(ctx, shared: Shared) -> LoRATab:
    catalog = ctx.engine.loras
    with gr.Tab("LoRA", id="lora"):
        folders = ", ".join(f"`{f}`" for f in catalog.folders)
        gr.Markdown(f"LoRAs found in {folders}." if folders else
                    "No LoRA folder was given: start with `--lora-dir DIR` to pick LoRAs here.")
        with gr.Row():
            choice = gr.Dropdown(catalog.names(), value=None, label="LoRA", elem_id="lora-choice", scale=3)
            scale = gr.Slider(-2.0, 2.0, 1.0, step=0.05, label="Scale", elem_id="lora-scale", scale=2)
        with gr.Row():
            add = gr.Button("Add to the stack", variant="primary", elem_id="lora-add")
            rescan = gr.Button("Rescan the folders", elem_id="lora-rescan")
            clear = gr.Button("Clear the stack", elem_id="lora-clear")
        shared.loras.render()

    def add_row(name, value, rows):
        if not name:
            raise gr.Error("pick a LoRA first", print_exception=False)
        rows = [list(r) for r in (rows or []) if r and r[0] and r[0] != name]
        return rows + [[name, float(value)]]

    def rescan_names():
        ctx.engine.loras.rescan()  # the current engine's (the Models tab may have restarted it)
        return gr.update(choices=ctx.engine.loras.names())

    add.click(add_row, inputs=[choice, scale, shared.loras], outputs=shared.loras)
    rescan.click(rescan_names, outputs=choice)
    clear.click(lambda: [], outputs=shared.loras)
    return LoRATab(choice, scale, add)
