"""The Edit tab: one to three images and an instruction (Qwen-Image-Edit; several images: Edit-2509/2511's
"Picture k:" template), with Lowres-Fix."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .. import forms
from .common import RunPanel, SettingsPanel, Shared, run_panel, settings_panel, wire_preset, wire_run

LOWRES_FIX = ("Lowres-Fix: keep the edit images at their own size and place them on the output's grid "
              "(edit_rope_interpolation; for DiffSynth-Studio/Qwen-Image-Edit-Lowres-Fix in the LoRA stack)")


@dataclass
class EditTab:
    images: list[gr.Image]
    prompt: gr.Textbox
    settings: SettingsPanel
    panel: RunPanel


def build(ctx, shared: Shared) -> EditTab:
    with gr.Tab("Edit", id="edit"):
        with gr.Row():
            # Qwen-Image 2.1 reads RGBA: its pictures keep their transparency (Gradio's default mode is RGB).
            images = [gr.Image(label=f"Image {k + 1}" + ("" if k == 0 else " (optional)"), type="pil", format="png",
                               image_mode="RGBA" if ctx.qwen21 else "RGB", sources=["upload", "clipboard"],
                               height=220, elem_id=f"edit-image-{k + 1}")
                      for k in range(3)]
        prompt = gr.Textbox(label="Instruction", lines=2, placeholder="what to change", elem_id="edit-prompt")
        lowres = gr.Checkbox(False, label=LOWRES_FIX, elem_id="edit-lowres", visible=not ctx.qwen21)  # 20B only
        settings = settings_panel(ctx, "edit", follow_input=True)
        panel = run_panel("edit", shared, "Edit")
    wire_preset(ctx, settings, shared)
    wire_run(ctx, "edit", panel, {prompt, lowres, shared.loras, *images, *settings.components()},
             lambda data: forms.edit(data[prompt], settings.values(data), [data[i] for i in images], data[lowres],
                                     ctx.picture_template, data[shared.loras],
                                     ctx.default_size[0] * ctx.default_size[1] if ctx.demo else None,
                                     keep_alpha=ctx.qwen21))
    return EditTab(images, prompt, settings, panel)
