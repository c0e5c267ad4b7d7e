"""The Train tab: a dataset folder and its captions, LoRA settings, start / stop / resume, a live loss plot,
validation images and the run's log. The run is `qistudio train` in a subprocess (ui/training.py)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import gradio as gr

from ...validation import InputError
from .. import dataset
from ..training import TrainSettings

TICK_SECONDS = 1.0
LOG_LINES = 10


def _loss_frame(points):
    import pandas as pd  # a dependency of gradio

    # Explicit dtypes: an empty frame would be read as categories, and the plot would keep them.
    return pd.DataFrame(points or [], columns=["step", "loss"]).astype({"step": "int64", "loss": "float64"})


def _user_error(function):
    """Run `function`, showing an InputError as the page's error message."""
    def wrapped(*args):
        try:
            return function(*args)
        except InputError as error:
            raise gr.Error(str(error), print_exception=False) from None
    return wrapped


def _dataset_section(ctx) -> gr.Textbox:
    """The folder, its captions table and images; the folder box (the run's dataset)."""
    with gr.Row():
        folder = gr.Textbox(label="Dataset folder (images + metadata.csv)", scale=4, elem_id="train-folder")
        load = gr.Button("Load captions", elem_id="train-load", scale=1)
        demo = gr.Button("Make the demo dataset", elem_id="train-demo", scale=1)
    captions = gr.Dataframe(headers=["image", "prompt"], datatype=["str", "str"], type="array", interactive=True,
                            column_count=2, label="Captions (edit, then save)", elem_id="train-captions")
    save = gr.Button("Save captions", elem_id="train-save")
    thumbs = gr.Gallery(label="Images", columns=8, height=160, interactive=False, elem_id="train-images")

    def read(path):
        rows = dataset.read_captions(path)
        return rows, dataset.thumbnails(path, rows)

    def make_demo():
        from ...training.demo_data import write_demo_dataset

        path = str(write_demo_dataset(ctx.train_dir / "demo_dataset").parent)
        return (path, *read(path))

    def write(path, rows):
        gr.Info(f"saved {dataset.write_captions(path, rows)}")
        return dataset.thumbnails(path, rows)

    load.click(_user_error(read), inputs=folder, outputs=[captions, thumbs])
    demo.click(_user_error(make_demo), outputs=[folder, captions, thumbs])
    save.click(_user_error(write), inputs=[folder, captions], outputs=thumbs)
    return folder


@dataclass
class TrainForm:
    folder: gr.Textbox
    name: gr.Textbox
    rank: gr.Number
    rate: gr.Number
    steps: gr.Number
    every: gr.Number
    pixels: gr.Number
    checkpointing: gr.Checkbox
    prompt: gr.Textbox
    val_every: gr.Number
    val_width: gr.Number
    val_height: gr.Number
    val_steps: gr.Number

    def components(self) -> set:
        return {getattr(self, f.name) for f in fields(self)}

    def values(self, data: dict, ctx) -> TrainSettings:
        def whole(box):
            return None if data[box] in (None, "") else int(data[box])

        width, height = ctx.default_size
        return TrainSettings(
            name=(data[self.name] or "").strip(), dataset=(data[self.folder] or "").strip(),
            rank=whole(self.rank) or 0, learning_rate=float(data[self.rate] or 0), max_steps=whole(self.steps) or 0,
            save_steps=whole(self.every) or 0, max_pixels=whole(self.pixels) or 0,
            gradient_checkpointing=bool(data[self.checkpointing]), validation_prompt=data[self.prompt] or "",
            validation_steps=whole(self.val_every),
            validation_size=(whole(self.val_width) or width, whole(self.val_height) or height),
            validation_inference_steps=whole(self.val_steps) or ctx.default_steps)  # fmt: skip


def _settings_section(ctx, folder: gr.Textbox) -> TrainForm:
    width, height = ctx.default_size
    with gr.Accordion("LoRA settings", open=True):
        with gr.Row():
            name = gr.Textbox("my_lora", label="Run name (folder under the output folder's train/)",
                              elem_id="train-name")
            rank = gr.Number(16, label="LoRA rank", precision=0, minimum=1, elem_id="train-rank")
            rate = gr.Number(1e-4, label="Learning rate", minimum=0, elem_id="train-rate")
        with gr.Row():
            steps = gr.Number(500, label="Steps", precision=0, minimum=1, elem_id="train-steps")
            every = gr.Number(50, label="Save a checkpoint every N steps", precision=0, minimum=1,
                              elem_id="train-save-steps")
            pixels = gr.Number(1024 * 1024, label="Max pixels per image", precision=0, minimum=64,
                               elem_id="train-pixels")
            checkpointing = gr.Checkbox(False, label="Gradient checkpointing (less memory)",
                                        elem_id="train-checkpointing")
        with gr.Row():
            prompt = gr.Textbox(label="Validation prompt (empty: none)", elem_id="train-val-prompt")
            val_every = gr.Number(None, label="Validate every N steps (empty: at the end)", precision=0, minimum=1,
                                  elem_id="train-val-every")
            val_width = gr.Number(width, label="Validation width", precision=0, elem_id="train-val-width")
            val_height = gr.Number(height, label="Validation height", precision=0, elem_id="train-val-height")
            val_steps = gr.Number(ctx.default_steps, label="Validation steps", precision=0,
                                  elem_id="train-val-steps")
    return TrainForm(folder, name, rank, rate, steps, every, pixels, checkpointing, prompt, val_every, val_width,
                     val_height, val_steps)


def _run_section(ctx, form: TrainForm) -> None:
    """Start / Stop / Resume, and what the run writes, read every TICK_SECONDS while it goes."""
    run = ctx.training
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
        resume = gr.Button("Resume", elem_id="train-resume")
    status = gr.Markdown(run.status(), elem_id="train-status")
    with gr.Row():
        plot = gr.LinePlot(_loss_frame(run.losses()), x="step", y="loss", title="Training loss", height=260,
                           elem_id="train-plot")
        samples = gr.Gallery(label="Validation images (latest first)", columns=4, height=260, preview=True,
                             object_fit="contain", interactive=False, elem_id="train-samples")
    log = gr.Textbox(label="Log (last lines)", lines=LOG_LINES, max_lines=LOG_LINES, interactive=False,
                     elem_id="train-log")
    weights = gr.Markdown("", elem_id="train-weights")
    timer = gr.Timer(TICK_SECONDS, active=False)

    def launch(data, resuming: bool):
        cpu = all(device == "cpu" for device in ctx.engine.config.devices)
        try:
            message = run.start(form.values(data, ctx), ctx.holder.spec, cpu, resume=resuming)
        except (InputError, OSError) as error:
            raise gr.Error(str(error), print_exception=False) from None
        gr.Info(message)
        return run.status(), gr.Timer(active=True)

    def halt():
        gr.Info(run.stop())
        return run.status()

    def tick():
        files = run.weights()
        listing = ("**LoRA files:** " + ", ".join(f"`{f}`" for f in files[:5])) if files else ""
        return (run.status(), _loss_frame(run.losses()), run.samples(), run.log_tail(LOG_LINES), listing,
                gr.Timer(active=run.running))

    start.click(lambda data: launch(data, False), inputs=form.components(), outputs=[status, timer])
    resume.click(lambda data: launch(data, True), inputs=form.components(), outputs=[status, timer])
    stop.click(halt, outputs=status)
    timer.tick(tick, outputs=[status, plot, samples, log, weights, timer], show_progress="hidden")


def build(ctx) -> None:
    with gr.Tab("Train", id="train"):
        folder = _dataset_section(ctx)
        form = _settings_section(ctx, folder)
        _run_section(ctx, form)
