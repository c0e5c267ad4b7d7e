"""`qistudio serve`: the model behind OpenAI's images API, with a job queue, batching and one worker per GPU.

The model comes from the same flags as `qistudio generate` (--model ID|FOLDER, --demo, --model-dir,
--skip-download, --download-source), found by the same code (cli.generate.model_configs); hub files are
downloaded once here, before any worker starts, and the workers read them from disk. The server binds 127.0.0.1
unless told otherwise, and any other address needs an API key (--api-key or $QISTUDIO_API_KEY). LoRAs are
served by name from the folders given with --lora-dir, never from a path in a request.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from .generate import DOWNLOAD_SOURCES, DTYPES, HUB_MODEL, positive_int
from .serve_models import check_family_flags
from .speed import vram_gib

API_KEY_ENV = "QISTUDIO_API_KEY"
DEMO_SIZE, DEMO_STEPS = (256, 256), 8
FULL_SIZE, FULL_STEPS = (1328, 1328), 30


def workers_arg(text: str) -> int | str:
    if text == "auto":
        return text
    return positive_int(text)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve the model over HTTP (OpenAI's images API)",
        description="Serve the model over HTTP: OpenAI's /v1/images/generations and /v1/images/edits, a jobs API "
        "with progress events, /v1/models, /health and /metrics. Requests are queued, batched where they share "
        "a DiT call, and run by one worker process per GPU. Qwen-Image, Qwen-Image-Layered and Qwen-Image 2.1 "
        "models are told apart from the model given; Blockwise ControlNets (--controlnet) and a Layered model "
        "(--layered-model) may be served beside a Qwen-Image one.",
    )  # fmt: skip
    p.add_argument("--model", help=f"hub id or local folder (default: {HUB_MODEL})")
    p.add_argument("--demo", action="store_true", help="serve the tiny random demo model (offline, CPU-friendly)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; any other needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    p.add_argument("--lora-dir", action="append", dest="lora_dirs", metavar="DIR", default=[],
                   help="a folder of LoRA files requests may name (repeatable)")
    p.add_argument("--max-steps", type=positive_int, default=100, help="most denoising steps a request may ask")
    p.add_argument("--max-n", type=positive_int, default=8, help="most images per request (n)")
    p.add_argument("--max-pixels", type=positive_int, default=2048 * 2048, help="most pixels of an output image")
    p.add_argument("--max-upload-mb", type=positive_int, default=64, help="largest request body, in MiB")
    p.add_argument("--ray", action="store_true",
                   help="run on Ray Serve (the cluster at $RAY_ADDRESS, else a local one): a replica per GPU, "
                   "autoscaled between --workers and --max-workers on the requests waiting")
    p.add_argument("--max-workers", type=positive_int, help="with --ray: most replicas (default: --workers)")
    add_engine_arguments(p, "speed and memory (each worker)")
    p.set_defaults(run=run, parser=p)
    return p


def add_engine_arguments(p: argparse.ArgumentParser, speed_title: str) -> None:
    """The flags of the engine behind a face (workers, queue, downloads, speed): shared by `serve` and `ui`."""
    p.add_argument("--workers", type=workers_arg, default="auto", metavar="N|auto",
                   help="worker processes (default auto: one per GPU, or one on the CPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="run the workers on the GPUs or the CPU "
                   "(default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--threads", type=positive_int, help="torch threads per CPU worker (default: cores / workers)")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting jobs before new ones are refused "
                   "(default: 64)")
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="most images in one DiT call (default: 8; 1 turns batching off; GPU memory may lower it)")
    p.add_argument("--preview-every", type=int, default=1, metavar="STEPS",
                   help="a small preview every STEPS steps while a job runs (0: none; default 1)")
    p.add_argument("--download-source", choices=DOWNLOAD_SOURCES,
                   help="hub to download from (default: $QISTUDIO_DOWNLOAD_SOURCE or modelscope)")
    p.add_argument("--model-dir", metavar="DIR", help="where downloads go (default: $QISTUDIO_MODEL_BASE_PATH or "
                   "./models)")
    p.add_argument("--skip-download", action="store_true", default=None,
                   help="use the files under --model-dir as they are; never contact the hub")
    p.add_argument("--controlnet", action="append", dest="controlnets", metavar="KIND[=SOURCE]", default=[],
                   type=controlnet_arg, help="load a Blockwise ControlNet requests may name by KIND (canny, depth, "
                   "inpaint; repeatable), from SOURCE (a file, folder or hub id; default DiffSynth-Studio's "
                   "Qwen-Image-Blockwise-ControlNet-KIND); --demo has a tiny canny one")
    p.add_argument("--layered-model", metavar="ID|FOLDER", help="also serve Qwen-Image-Layered (layer "
                   "decomposition; loaded by each worker on its first layers job); --demo has a tiny one")
    group = p.add_argument_group(speed_title)
    group.add_argument("--vram-limit", type=vram_gib, metavar="GiB", help="fit the models into this much GPU memory")
    group.add_argument("--fp8", action="store_true", help="FP8 compute for the DiT (Hopper or newer)")
    group.add_argument("--compile", action="store_true", help="regional torch.compile of the DiT's blocks")


def controlnet_arg(text: str) -> str:
    from .generate import CONTROL_KINDS

    if text.split("=", 1)[0] not in CONTROL_KINDS or text.endswith("="):
        raise argparse.ArgumentTypeError(f"expected KIND or KIND=SOURCE with KIND one of {', '.join(CONTROL_KINDS)}, "
                                         f"got {text!r}")
    return text


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse what cannot work before anything loads."""
    from ..server.security import is_loopback

    error = args.parser.error
    if args.demo and args.model:
        error("give --demo or --model, not both")
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not args.api_key:
        error(f"--host {args.host} is reachable from other machines: give --api-key KEY (or set ${API_KEY_ENV}) "
              "so that only callers with the key are served")
    if not 0 < args.port < 65536:
        error(f"--port must be in 1..65535, got {args.port}")
    for folder in args.lora_dirs:
        if not Path(folder).expanduser().is_dir():
            error(f"--lora-dir {folder}: no such folder")
    if args.preview_every < 0:
        error(f"--preview-every must be >= 0, got {args.preview_every}")
    check_family_flags(args)


def devices(args: argparse.Namespace) -> tuple[str, ...]:
    import torch

    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    if args.device == "cuda" and gpus == 0:
        args.parser.error("--device cuda: no CUDA device is available here; use --device cpu")
    count = args.workers if args.workers != "auto" else max(1, gpus)
    if gpus:
        if count > gpus:
            print(f"note: {count} workers on {gpus} GPU(s): some share a GPU", file=sys.stderr)
        return tuple(f"cuda:{i % gpus}" for i in range(count))
    return ("cpu",) * count


def model_spec(args: argparse.Namespace, fetch: bool = True):
    """The ModelSpec for the workers (serve_models.py); hub files are downloaded here, once (with `fetch`; on Ray
    each node downloads its own)."""
    from .serve_models import model_spec as build

    return build(args, fetch)


def server_settings(args: argparse.Namespace, spec):
    from ..server.settings import Limits, ServerSettings
    from .generate import uses_picture_template

    from .generate21 import QWEN21_SIZE, QWEN21_STEPS

    model = spec.extra["model"]
    qwen21 = spec.family == "qwen-image-2.1"
    size, steps = (DEMO_SIZE, DEMO_STEPS) if args.demo else (QWEN21_SIZE, QWEN21_STEPS) if qwen21 else (
        FULL_SIZE, FULL_STEPS)
    return ServerSettings(
        model_name=spec.name, png_model=model, demo=args.demo, family=spec.family, default_size=size,
        controlnets=spec.controlnet_names,
        default_steps=steps,
        picture_template=bool(model) and uses_picture_template({"edit": [None], "model": model}),
        api_key=args.api_key,
        limits=Limits(max_body_bytes=args.max_upload_mb * 2**20, max_pixels=args.max_pixels, max_n=args.max_n,
                      max_steps=args.max_steps),
    )  # fmt: skip


def engine_config(args: argparse.Namespace, spec, slots: tuple[str, ...], threads: int | None):
    from ..engine import EngineConfig

    return EngineConfig(model=spec, devices=slots, max_queue=args.max_queue, max_batch_images=args.max_batch,
                        preview_every=args.preview_every, threads_per_worker=threads, lora_dirs=tuple(args.lora_dirs))


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    spec = model_spec(args, fetch=not args.ray)
    settings = server_settings(args, spec)
    if args.ray:
        return serve_on_ray(args, spec, settings)
    import uvicorn

    from ..engine import Engine
    from ..server.app import create_app

    slots = devices(args)
    threads = args.threads or (max(1, (os.cpu_count() or 1) // len(slots)) if slots[0] == "cpu" else None)
    print(f"loading {spec.name} on {len(slots)} worker(s): {', '.join(slots)}", file=sys.stderr)
    engine = Engine(engine_config(args, spec, slots, threads)).start()
    app = create_app(engine, settings)
    from ..ui.mount import with_ui  # the web UI at /ui over the same engine, when Gradio is installed
    app = with_ui(app, engine, settings)
    print(f"serving {spec.name} on http://{args.host}:{args.port}/v1 (Ctrl-C stops; running jobs finish first)",
          file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    except KeyboardInterrupt:
        pass  # uvicorn raises the Ctrl-C again once it has stopped: the stop asked for, complete
    finally:
        engine.shutdown()
    print("stopped", file=sys.stderr)
    return 0


def serve_on_ray(args: argparse.Namespace, spec, settings) -> int:
    """The application on Ray Serve: the cluster at $RAY_ADDRESS, else a local one started here."""
    import ray
    from ray import serve

    from ..server.ray_app import build

    ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level=logging.WARNING)
    gpus = args.device != "cpu" and int(ray.cluster_resources().get("GPU", 0)) > 0
    if args.device == "cuda" and not gpus:
        args.parser.error("--device cuda: the Ray cluster has no GPU; use --device cpu")
    workers = args.workers if args.workers != "auto" else max(1, int(ray.cluster_resources().get("GPU", 0)))
    most = max(workers, args.max_workers or workers)
    threads = None if gpus else (args.threads or 1)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build(engine_config(args, spec, ("ray",), threads), settings, workers, most, gpus, threads)
    print(f"loading {spec.name} on {workers} to {most} Ray Serve replica(s), each on "
          f"{'a GPU' if gpus else f'{threads} CPU(s)'}", file=sys.stderr)
    serve.run(app, name="qistudio", route_prefix="/", blocking=False)
    print(f"serving {spec.name} on http://{args.host}:{args.port}/v1 through Ray Serve (Ctrl-C stops)",
          file=sys.stderr)
    stop = {signal.SIGINT, signal.SIGTERM}
    try:
        # Blocked only now, after Ray's processes started (they would inherit the mask), then waited for.
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("stopped", file=sys.stderr)
    return 0
