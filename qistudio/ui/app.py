"""The Gradio app: the tabs over one UIContext, and the ways to serve it (alone, or mounted in `qistudio serve`).

Every feature tab builds a JobSpec (forms.py) and runs it through the engine (runs.py): the same request type,
queue and workers as the CLI's and the HTTP API's, never a pipeline of its own.
"""

from __future__ import annotations

import gradio as gr

from .context import UIContext
from .runs import Runs
from .tabs import common, control, edit, eligen, gallery, generate, inpaint, layers, loras, models, train
from .training import TrainingRun

TITLE = "qistudio"
CSS = ("#gen-status, #edit-status, #inpaint-status, #eligen-status, #control-status, #layers-status, "
       "#train-status {min-height: 1.5em}")


def build_blocks(ctx: UIContext) -> gr.Blocks:
    ctx.runs = ctx.runs or Runs(ctx.holder)
    ctx.training = ctx.training or TrainingRun(ctx.train_dir)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
        gr.Markdown(f"## qistudio · {ctx.holder.spec.name}")
        shared = common.Shared(loras=loras.stack_table())
        with gr.Tabs() as tabs:
            generate_tab = generate.build(ctx, shared)
            edit_tab = edit.build(ctx, shared)
            inpaint_tab = inpaint.build(ctx, shared)
            eligen.build(ctx, shared)
            control.build(ctx, shared)
            layers.build(ctx, shared)
            loras.build(ctx, shared)
            models.build(ctx)
            gallery.build(ctx, tabs, shared, generate_tab, edit_tab, inpaint_tab)
            train.build(ctx)
    blocks.queue(default_concurrency_limit=None)  # the engine queues; the UI never holds a job back
    return blocks


def launch_options(ctx: UIContext) -> dict:
    """What both launch() and mount_gradio_app() take: files the UI may serve, no server-side rendering."""
    return {"allowed_paths": [str(ctx.output_dir)], "ssr_mode": False, "css": CSS, "footer_links": []}
