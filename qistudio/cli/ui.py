"""`qistudio ui`: the studio in the browser (Gradio), over the same engine as `qistudio serve`.

The model comes from the same flags as `qistudio serve` (--model ID|FOLDER, --demo, ...), found and loaded by the
same code (cli.serve.model_spec, the engine's workers). The UI binds 127.0.0.1 unless told otherwise; another
address, or a public --share link, needs a password (--password or $QISTUDIO_UI_PASSWORD), asked for by a login
page. Results, the inputs that made them and training runs are written under --output-dir.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from ..fileio import unwritable_folder_reason
from .serve import add_engine_arguments
from .serve_models import check_family_flags

PASSWORD_ENV = "QISTUDIO_UI_PASSWORD"
DEFAULT_OUTPUT = "./outputs"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ui", help="the studio in the browser (generate, edit, inpaint, EliGen, control, LoRAs, training)",
        description="Start the web UI: every feature one form away, run by the same engine (job queue, worker "
        "processes, progress with previews, cancellation) as `qistudio serve`. Needs the ui extra: "
        "pip install 'qistudio[ui]'.",
    )  # fmt: skip
    p.add_argument("--model", help="hub id or local folder (default: Qwen/Qwen-Image)")
    p.add_argument("--demo", action="store_true", help="the tiny random demo model (offline, CPU-friendly)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; any other needs --password)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true",
                   help="also open a public gradio.live link (needs --password)")
    p.add_argument("--password", help=f"password of the login page (default: ${PASSWORD_ENV}); required with "
                   "--share or a --host other than this machine")
    p.add_argument("--user", default="qistudio", help="user name of the login page (default: qistudio)")
    p.add_argument("--lora-dir", action="append", dest="lora_dirs", metavar="DIR", default=[],
                   help="a folder of LoRA files to pick from (repeatable)")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT, metavar="DIR",
                   help=f"where results, their inputs and training runs go (default: {DEFAULT_OUTPUT})")
    add_engine_arguments(p, "speed and memory (each worker; the Models tab can change them)")
    p.set_defaults(run=run, parser=p)
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse what cannot work, or would expose the UI without a password, before anything loads."""
    from ..server.security import is_loopback

    error = args.parser.error
    if args.demo and args.model:
        error("give --demo or --model, not both")
    args.password = args.password or os.environ.get(PASSWORD_ENV) or None
    if args.share and not args.password:
        error(f"--share makes the UI public: give --password (or set ${PASSWORD_ENV})")
    if not is_loopback(args.host) and not args.password:
        error(f"--host {args.host} is reachable from other machines: give --password (or set ${PASSWORD_ENV})")
    if not 0 < args.port < 65536:
        error(f"--port must be in 1..65535, got {args.port}")
    reason = _port_taken(args.host, args.port)
    if reason:
        error(f"--port {args.port}: cannot listen on {args.host}:{args.port} ({reason}); pick another port")
    for folder in args.lora_dirs:
        if not Path(folder).expanduser().is_dir():
            error(f"--lora-dir {folder}: no such folder")
    if args.preview_every < 0:
        error(f"--preview-every must be >= 0, got {args.preview_every}")
    check_family_flags(args)
    output = Path(args.output_dir).expanduser()
    if output.exists() and not output.is_dir():
        error(f"--output-dir {args.output_dir}: is a file")
    reason = unwritable_folder_reason(output if output.exists() else output.absolute().parent)
    if reason:
        error(f"--output-dir {args.output_dir}: {reason}")
    args.ray = False  # cli.serve.model_spec's download rule: here, always once in this process


def _port_taken(host: str, port: int) -> str | None:
    """Why the UI could not listen on host:port (checked before the model loads), or None."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server binds it
            probe.bind((host.strip("[]"), port))
    except OSError as e:
        return e.strerror or str(e)
    return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the UI as Ctrl-C does: the training run and the workers end first


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    signal.signal(signal.SIGTERM, _interrupt)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401  (checked before the model loads)
    except ImportError:
        raise ImportError("qistudio ui needs Gradio: pip install 'qistudio[ui]'") from None

    from ..engine import Engine
    from ..ui.app import build_blocks, launch_options
    from ..ui.context import EngineHolder, UIContext
    from .serve import devices, engine_config, model_spec

    slots = devices(args)
    threads = args.threads or (max(1, (os.cpu_count() or 1) // len(slots)) if slots[0] == "cpu" else None)

    def start(spec):
        print(f"loading {spec.name} on {len(slots)} worker(s): {', '.join(slots)}", file=sys.stderr)
        return Engine(engine_config(args, spec, slots, threads)).start()

    def reload(changes: dict):
        return model_spec(argparse.Namespace(**{**vars(args), **changes}))

    output = Path(args.output_dir).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    holder = EngineHolder(start(model_spec(args)))
    ctx = UIContext(holder, output, reload=reload, start_engine=start)
    try:
        blocks = build_blocks(ctx)
        print(f"qistudio UI on http://{args.host}:{args.port}/ (results in {output}; Ctrl-C stops)", file=sys.stderr)
        blocks.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True, quiet=True,
                      auth=(args.user, args.password) if args.password else None, **launch_options(ctx))
    finally:
        if ctx.training is not None:
            ctx.training.shutdown()
        holder.shutdown()
    print("stopped", file=sys.stderr)
    return 0
