"""The Gallery tab: every result with the parameters that made it; send one to Edit or Inpaint, or load its
parameters into Generate, also from a qistudio PNG dropped here."""

from __future__ import annotations

import gradio as gr
from PIL import Image

from ...validation import InputError
from .. import masks, records, sizes
from .common import Shared
from .edit import EditTab
from .generate import GenerateTab
from .inpaint import InpaintTab


def _shown(parameters: dict) -> dict:
    """The parameters without the unset ones (the CLI records every key)."""
    return {key: value for key, value in parameters.items() if value is not None}


def build(ctx, tabs: gr.Tabs, shared: Shared, generate: GenerateTab, edit: EditTab, inpaint: InpaintTab) -> None:
    with gr.Tab("Gallery", id="gallery") as tab:
        refresh = gr.Button("Refresh", elem_id="gallery-refresh")
        listing = gr.State([])  # the shown results' paths, in order
        chosen = gr.State(None)  # the selected result's path
        gallery = gr.Gallery(label=f"Results (the newest {records.LISTED}, newest first)", columns=6, height=420, interactive=False,
                             elem_id="gallery")
        with gr.Row():
            parameters = gr.JSON(label="Parameters", elem_id="gallery-params")
            with gr.Column():
                to_edit = gr.Button("Use as edit input", elem_id="gallery-to-edit")
                to_inpaint = gr.Button("Use as inpaint / image-to-image input", elem_id="gallery-to-inpaint")
                load = gr.Button("Load its parameters into Generate", elem_id="gallery-load")
                drop = gr.File(label="Drop a qistudio PNG here to load its parameters", file_types=[".png"],
                               elem_id="gallery-drop")

    def show():
        found = records.list_results(ctx.images_dir, records.LISTED)
        return found, [path for path, _ in found], None

    def select(paths, event: gr.SelectData):
        path = paths[event.index] if event.index is not None and event.index < len(paths) else None
        return path, _shown(records.read_parameters(path)) if path else None

    def picture(path):
        if not path:
            raise gr.Error("select a result first", print_exception=False)
        with Image.open(path) as image:
            return image.convert("RGB")

    settings = generate.settings
    fields_out = [generate.prompt, settings.negative, settings.seed_mode, settings.seed, settings.steps, settings.cfg,
                  settings.size, settings.width, settings.height, settings.num_images, settings.scheduler,
                  shared.loras, parameters, tabs]

    def load_fields(path):
        if not path:
            raise gr.Error("select a result or drop a PNG first", print_exception=False)
        try:
            stored = records.read_parameters(path)
        except InputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        values = records.generate_fields(stored, {name: str(ctx.engine.loras.path(name))
                                                  for name in ctx.engine.loras.names()})
        if values["missing_loras"]:
            gr.Warning(f"not in the LoRA folders, left out: {', '.join(values['missing_loras'])}")
        keep = gr.update()
        return [values["prompt"], values["negative"], "fixed" if values["seed"] is not None else "random",
                values["seed"] if values["seed"] is not None else keep, values["steps"] or keep,
                values["cfg"] if values["cfg"] is not None else keep, sizes.FREE if "width" in values else keep,
                values.get("width", keep), values.get("height", keep), values["num_images"] or 1,
                values["scheduler"], values["loras"], _shown(stored), gr.Tabs(selected="generate")]

    refresh.click(show, outputs=[gallery, listing, chosen])
    tab.select(show, outputs=[gallery, listing, chosen])
    gallery.select(select, inputs=listing, outputs=[chosen, parameters])
    to_edit.click(lambda path: (picture(path), gr.Tabs(selected="edit")), inputs=chosen,
                  outputs=[edit.images[0], tabs])
    to_inpaint.click(lambda path: (masks.with_background(picture(path)), gr.Tabs(selected="inpaint")),
                     inputs=chosen, outputs=[inpaint.editor, tabs], show_progress="hidden")  # see eligen.py
    load.click(load_fields, inputs=chosen, outputs=fields_out)
    drop.upload(load_fields, inputs=drop, outputs=fields_out)
