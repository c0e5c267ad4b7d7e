"""The Models tab: the model the workers loaded and how they run it; when the UI owns its engine, load another
model (a local folder or a hub id, downloaded with progress) or change the VRAM budget, FP8 and compile settings
by restarting the workers."""

from __future__ import annotations

import json

import gradio as gr

from ...engine import EngineError


def describe(ctx) -> str:
    spec = ctx.holder.spec
    lines = [f"**Model:** `{spec.name}`" + (" (tiny random demo model)" if ctx.demo else "")]
    for config in spec.model_configs:
        source = config.get("path") or f"{config.get('model_id')}:{config.get('origin_file_pattern')}"
        lines.append(f"- `{source}`")
    budget = "everything on the device" if spec.vram_limit is None else f"{spec.vram_limit:g} GiB"
    lines.append(f"**dtype:** {spec.dtype or 'bfloat16 on a GPU, float32 on the CPU'} · **VRAM budget:** {budget} · "
                 f"**FP8:** {'on' if spec.fp8 else 'off'} · **compile:** {'on' if spec.compile else 'off'}")
    devices = ", ".join(ctx.engine.config.devices)
    lines.append(f"**Workers:** {len(ctx.engine.config.devices)} ({devices})")
    return "\n\n".join(lines)


def health(ctx) -> str:
    return json.dumps(ctx.engine.health(), indent=1)


def build(ctx) -> None:
    with gr.Tab("Models", id="models"):
        info = gr.Markdown(describe(ctx), elem_id="models-info")
        report = gr.Code(health(ctx), language="json", label="Workers", elem_id="models-health")
        refresh = gr.Button("Refresh", elem_id="models-refresh")
        refresh.click(lambda: (describe(ctx), health(ctx)), outputs=[info, report])
        if ctx.reload is None:
            gr.Markdown("This UI shares the server's workers: their model and settings are the ones `qistudio "
                        "serve` was started with.")
            return
        spec = ctx.holder.spec
        gr.Markdown("### Load another model or change how it runs (restarts the workers)")
        source = gr.Textbox("demo" if ctx.demo else (spec.extra.get("model") or spec.name),
                            label="Model: a local folder, a hub id (Qwen/Qwen-Image), or demo", elem_id="models-source")
        with gr.Row():
            budget = gr.Number(spec.vram_limit, label="VRAM budget in GiB (empty: everything on the device)",
                               minimum=0, elem_id="models-vram")
            fp8 = gr.Checkbox(spec.fp8, label="FP8 compute (Hopper or newer)", elem_id="models-fp8")
            compile_ = gr.Checkbox(spec.compile, label="torch.compile the DiT's blocks", elem_id="models-compile")
        apply = gr.Button("Apply (restart the workers)", variant="primary", elem_id="models-apply")
        status = gr.Markdown("", elem_id="models-status")

    def restart(model, vram, fp8_on, compile_on, progress=gr.Progress(track_tqdm=True)):
        model = (model or "").strip()
        changes = {"demo": model == "demo", "model": None if model == "demo" else model or None,
                   "vram_limit": None if vram in (None, "") else float(vram), "fp8": bool(fp8_on),
                   "compile": bool(compile_on)}
        try:
            progress(0, desc="finding the model's files")
            new_spec = ctx.reload(changes)  # downloads what a hub id needs (tqdm bars show as progress)
            progress(0.9, desc="restarting the workers")
            ctx.holder.swap(new_spec, ctx.start_engine)
        except (ValueError, OSError, ImportError, EngineError) as error:
            raise gr.Error(f"kept {ctx.holder.spec.name}: {error}", print_exception=False) from None
        return describe(ctx), health(ctx), f"loaded {new_spec.name}"

    apply.click(restart, inputs=[source, budget, fp8, compile_], outputs=[info, report, status])
