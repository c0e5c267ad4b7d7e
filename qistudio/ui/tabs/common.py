"""The widgets every feature tab shares: the settings panel (size, steps, guidance, seed, ...) and the run panel
(Run, Cancel, status, live preview, results), and the one handler that runs a tab's JobSpec through the engine."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import gradio as gr

from ...cli.generate import SCHEDULERS
from ...engine import EngineError, JobState
from ...engine.spec import DEFAULT_SCHEDULER
from ...presets import LORA_PRESETS
from ...validation import InputError
from .. import sizes
from ..forms import Settings
from ..records import save_results

NO_PRESET = "none"
MAX_STEPS = 200
MAX_IMAGES = 8


@dataclass
class Shared:
    """Components more than one tab reads: the LoRA stack (rendered in the LoRA tab)."""

    loras: gr.Dataframe


@dataclass
class SettingsPanel:
    negative: gr.Textbox
    size: gr.Dropdown
    width: gr.Number
    height: gr.Number
    steps: gr.Slider
    cfg: gr.Slider
    seed_mode: gr.Radio
    seed: gr.Number
    num_images: gr.Slider
    scheduler: gr.Dropdown
    preset: gr.Dropdown
    table: dict  # the size presets shown

    def components(self) -> set:
        return {getattr(self, f.name) for f in fields(self) if f.name != "table"}

    def values(self, data: dict) -> Settings:
        size = sizes.chosen_size(data[self.size], data[self.width] or 0, data[self.height] or 0, self.table)
        if size is not None and min(size) < 16:
            raise InputError(f"size {size[0]}x{size[1]}: width and height must be at least 16")
        seed = None
        if data[self.seed_mode] == "fixed":
            if data[self.seed] is None or data[self.seed] < 0:
                raise InputError(f"seed must be a whole number >= 0, got {data[self.seed]}")
            seed = int(data[self.seed])
        return Settings(negative_prompt=data[self.negative] or "", size=size, steps=int(data[self.steps]),
                        cfg_scale=float(data[self.cfg]), seed=seed, num_images=int(data[self.num_images]),
                        scheduler=data[self.scheduler] or DEFAULT_SCHEDULER)


def settings_panel(ctx, prefix: str, follow_input: bool = False, open_: bool = True) -> SettingsPanel:
    """The settings; `follow_input` offers "the input image's size" (Edit, Inpaint), chosen by default."""
    table = sizes.presets(ctx.default_size)
    choices = [*([sizes.FOLLOW_INPUT] if follow_input else []), *table, sizes.FREE]
    width, height = ctx.default_size
    with gr.Accordion("Settings", open=open_):
        negative = gr.Textbox(label="Negative prompt", lines=1, elem_id=f"{prefix}-negative")
        with gr.Row():
            size = gr.Dropdown(choices, value=choices[0], label="Size (aspect ratio)", elem_id=f"{prefix}-size")
            width_box = gr.Number(width, label="Width", precision=0, minimum=16, step=16, elem_id=f"{prefix}-width")
            height_box = gr.Number(height, label="Height", precision=0, minimum=16, step=16,
                                   elem_id=f"{prefix}-height")
        with gr.Row():
            steps = gr.Slider(1, MAX_STEPS, ctx.default_steps, step=1, label="Steps", elem_id=f"{prefix}-steps")
            cfg = gr.Slider(1.0, 10.0, ctx.default_cfg, step=0.1, label="Guidance (1 = off)",
                            elem_id=f"{prefix}-cfg")
        with gr.Row():
            seed_mode = gr.Radio(["random", "fixed"], value="random", label="Seed", elem_id=f"{prefix}-seed-mode")
            seed = gr.Number(0, label="Seed value", precision=0, minimum=0, elem_id=f"{prefix}-seed")
            num_images = gr.Slider(1, MAX_IMAGES, 1, step=1, label="Images", elem_id=f"{prefix}-num-images")
        with gr.Row():
            scheduler = gr.Dropdown(list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="Scheduler",
                                    elem_id=f"{prefix}-scheduler")
            preset = gr.Dropdown([NO_PRESET, *LORA_PRESETS], value=NO_PRESET, label="Distilled preset",
                                 info="sets steps, guidance and scheduler; adds its LoRA if it is in --lora-dir",
                                 elem_id=f"{prefix}-preset")
    # Typing a width or height means a free size.
    for box in (width_box, height_box):
        box.input(lambda: sizes.FREE, outputs=size, show_progress="hidden")
    size.input(lambda choice: [gr.update(value=table[choice][0]), gr.update(value=table[choice][1])]
               if choice in table else [gr.update(), gr.update()], inputs=size, outputs=[width_box, height_box],
               show_progress="hidden")
    return SettingsPanel(negative, size, width_box, height_box, steps, cfg, seed_mode, seed, num_images, scheduler,
                         preset, table)


def wire_preset(ctx, panel: SettingsPanel, shared: Shared) -> None:
    """A distilled preset sets steps, guidance and scheduler and stacks its LoRA when the catalog has its file."""

    def choose(name, rows):
        if name not in LORA_PRESETS:
            return gr.update(), gr.update(), gr.update(), gr.update()
        preset = LORA_PRESETS[name]
        rows = [list(r) for r in (rows or []) if r and r[0]]
        stem = preset.file.removesuffix(".safetensors")
        found = [n for n in ctx.engine.loras.names() if n == stem or n.endswith("/" + stem)]
        if found and all(r[0] != found[0] for r in rows):
            rows.append([found[0], 1.0])
        if not found:
            gr.Warning(f"{preset.file} (from {preset.repository}) is not in the LoRA folders; put it there to use "
                       "this preset")
        return preset.steps, preset.cfg_scale, preset.scheduler, rows

    panel.preset.input(choose, inputs=[panel.preset, shared.loras],
                       outputs=[panel.steps, panel.cfg, panel.scheduler, shared.loras])


@dataclass
class RunPanel:
    run: gr.Button
    cancel: gr.Button
    status: gr.Markdown
    preview: gr.Image
    results: gr.Gallery


def stack_text(rows) -> str:
    pairs = [(r[0], r[1]) for r in (rows or []) if r and r[0]]
    if not pairs:
        return "LoRAs: none (add them in the LoRA tab)"
    return "LoRAs: " + ", ".join(f"{name} ({float(scale):g})" for name, scale in pairs)


def run_panel(prefix: str, shared: Shared, label: str = "Generate") -> RunPanel:
    note = gr.Markdown(stack_text([]), elem_id=f"{prefix}-loras")
    shared.loras.change(stack_text, inputs=shared.loras, outputs=note, show_progress="hidden")
    with gr.Row():
        run = gr.Button(label, variant="primary", elem_id=f"{prefix}-run")
        cancel = gr.Button("Cancel", variant="stop", elem_id=f"{prefix}-cancel")
    status = gr.Markdown("", elem_id=f"{prefix}-status")
    with gr.Row():
        preview = gr.Image(label="Preview", type="pil", interactive=False, height=256, elem_id=f"{prefix}-preview")
        results = gr.Gallery(label="Results", columns=4, height=256, object_fit="contain", preview=True,
                             interactive=False, elem_id=f"{prefix}-results")
    return RunPanel(run, cancel, status, preview, results)


def wire_run(ctx, tab: str, panel: RunPanel, inputs: set, build: Callable[[dict], object]) -> None:
    """Run: build the JobSpec from the inputs and stream the job's progress, previews and results; Cancel: cancel
    this browser's job of this tab."""

    def run(data: dict, request: gr.Request):
        try:
            spec = build(data)
            yield {panel.status: "submitting", panel.preview: None}
            for update in ctx.runs.follow(spec, (request.session_hash, tab)):
                out = {panel.status: update.status}
                if update.preview is not None:
                    out[panel.preview] = update.preview
                if update.finished and update.job.state is JobState.SUCCEEDED:
                    paths = save_results(update.job, ctx)
                    out[panel.results] = [(str(p), f"seed {update.job.spec.arguments['seed']}") for p in paths]
                    out[panel.preview] = update.job.result.images[0]
                    out[panel.status] = f"{update.status}; saved {', '.join(p.name for p in paths)}"
                yield out
        except (InputError, EngineError, ValueError) as error:
            raise gr.Error(str(error), print_exception=False) from None

    def cancel(request: gr.Request):
        gr.Info(ctx.runs.cancel((request.session_hash, tab)))

    panel.run.click(run, inputs=inputs, outputs=[panel.status, panel.preview, panel.results],
                    concurrency_limit=None, show_progress="minimal")
    panel.cancel.click(cancel, concurrency_limit=None, show_progress="hidden")
