"""The Generate tab: text-to-image with the shared settings and the LoRA stack."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .. import forms
from .common import RunPanel, SettingsPanel, Shared, run_panel, settings_panel, wire_preset, wire_run


@dataclass
class GenerateTab:
    prompt: gr.Textbox
    settings: SettingsPanel
    panel: RunPanel


def build(ctx, shared: Shared) -> GenerateTab:
    with gr.Tab("Generate", id="generate"):
        prompt = gr.Textbox(label="Prompt", lines=3, placeholder="what to draw", elem_id="gen-prompt")
        settings = settings_panel(ctx, "gen")
        panel = run_panel("gen", shared)
    wire_preset(ctx, settings, shared)
    wire_run(ctx, "generate", panel, {prompt, shared.loras, *settings.components()},
             lambda data: forms.generation(data[prompt], settings.values(data), data[shared.loras]))
    return GenerateTab(prompt, settings, panel)
