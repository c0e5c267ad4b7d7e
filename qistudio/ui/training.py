"""The Train tab's run: `qistudio train` as a subprocess of the UI, started, stopped and resumed, watched through
the files it writes.

Design note. Training runs in its own process, exactly as the command line runs it (the same argument parser,
the same Trainer), so the UI adds no second training path and a crash in training cannot take the UI down. The UI
reads what the run writes: its log (stdout and stderr, into OUTPUT/train/NAME/ui-train.log), loss.csv
(--enable_csv_log: the live loss plot) and samples/step-N/*.png (validation images). Stop sends SIGINT, which the
trainer takes as Ctrl-C (the run ends at once, its output folder's lock released); Resume starts the same command
with --resume, which continues from the last checkpoint (--save_steps sets how often one is written). One run at
a time per UI.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ..validation import InputError

LOG_FILE = "ui-train.log"
# `qistudio train` with Ctrl-C's handler set first: a UI started in the background (`qistudio ui ... &` from a
# script) has SIGINT ignored, and a child would inherit that, leaving Stop without effect.
ENTRY = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
         "from qistudio.cli.main import main; sys.exit(main(sys.argv[1:]))")
STOP_GRACE_SECONDS = 60  # after SIGINT, before the run is terminated
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class TrainSettings:
    """The Train tab's form: what to train on, the LoRA, and the validation images."""

    name: str
    dataset: str  # a folder holding metadata.csv (columns image, prompt)
    rank: int = 16
    learning_rate: float = 1e-4
    max_steps: int = 500
    save_steps: int = 50
    max_pixels: int = 1024 * 1024
    gradient_checkpointing: bool = False
    validation_prompt: str = ""
    validation_steps: int | None = None  # None: at the last step only
    validation_size: tuple[int, int] = (1024, 1024)
    validation_inference_steps: int = 30


def model_arguments(spec) -> tuple[list[str], dict]:
    """`qistudio train`'s model arguments for the UI's ModelSpec (local files, or hub ids with their patterns),
    and the environment that points the trainer at the same download folder."""
    paths, hub, env = [], [], {}
    for config in spec.model_configs:
        if config.get("path"):
            paths.append(config["path"])
        elif config.get("model_id"):
            patterns = config["origin_file_pattern"]
            for pattern in patterns if isinstance(patterns, list) else [patterns]:
                hub.append(f"{config['model_id']}:{pattern}")
            if config.get("local_model_path"):
                env["QISTUDIO_MODEL_BASE_PATH"] = str(config["local_model_path"])
    out = []
    if paths:
        out += ["--model_paths", json.dumps(paths)]
    if hub:
        out += ["--model_id_with_origin_paths", ",".join(hub)]
    for flag, config in (("--tokenizer_path", spec.tokenizer_config), ("--processor_path", spec.processor_config)):
        if config and config.get("path"):
            out += [flag, str(config["path"])]
    if spec.dtype:
        out += ["--dtype", spec.dtype]
    return out, env


def command(settings: TrainSettings, spec, output: Path, resume: bool, cpu: bool) -> tuple[list[str], dict]:
    """The command line of the run, and the environment it adds."""
    dataset = Path(settings.dataset).expanduser().resolve()
    models, env = model_arguments(spec)
    line = [sys.executable, "-c", ENTRY, "train", *models,
            "--dataset_base_path", str(dataset), "--dataset_metadata_path", str(dataset / "metadata.csv"),
            "--lora_base_model", "dit", "--lora_rank", str(settings.rank), "--learning_rate", f"{settings.learning_rate:g}",
            "--max_steps", str(settings.max_steps), "--save_steps", str(settings.save_steps),
            "--max_pixels", str(settings.max_pixels), "--output_path", str(output), "--enable_csv_log"]  # fmt: skip
    if settings.gradient_checkpointing:
        line.append("--use_gradient_checkpointing")
    if settings.validation_prompt.strip():
        width, height = settings.validation_size
        line += ["--validation_prompts", settings.validation_prompt.strip(), "--validation_size", f"{width}x{height}",
                 "--validation_num_inference_steps", str(settings.validation_inference_steps)]
        if settings.validation_steps:
            line += ["--validation_steps", str(settings.validation_steps)]
    if cpu:
        line += ["--device", "cpu"]
    if resume:
        line.append("--resume")
    return line, env


def check(settings: TrainSettings) -> None:
    """Refuse a form that cannot start, naming the field."""
    if not _NAME.match(settings.name or ""):
        raise InputError(f"run name {settings.name!r}: use letters, digits, '_', '-' and '.' (a folder name)")
    metadata = Path(settings.dataset or "").expanduser() / "metadata.csv"
    if not settings.dataset or not metadata.is_file():
        raise InputError(f"dataset folder {settings.dataset!r} has no metadata.csv: load it and save its captions "
                         "first (or make the demo dataset)")
    for name in ("rank", "max_steps", "save_steps", "max_pixels"):
        if int(getattr(settings, name)) < 1:
            raise InputError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(settings, name)}")
    if not settings.learning_rate > 0:
        raise InputError(f"learning rate must be > 0, got {settings.learning_rate}")


class TrainingRun:
    """The one training run of a UI: OUTPUT/train/NAME, its process, and what it has written."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.process: subprocess.Popen | None = None
        self.settings: TrainSettings | None = None
        self.stop_requested = False
        self._lock = threading.Lock()

    @property
    def output(self) -> Path | None:
        return None if self.settings is None else self.root / self.settings.name

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, settings: TrainSettings, spec, cpu: bool, resume: bool = False) -> str:
        check(settings)
        output = self.root / settings.name
        with self._lock:
            if self.running:
                raise InputError(f"a run is going ({self.settings.name}); stop it first")
            checkpoints = output / "checkpoints"
            if resume and not checkpoints.is_dir():
                raise InputError(f"run {settings.name!r} has no checkpoint to resume from (one is saved every "
                                 "'save every' steps)")
            if not resume and checkpoints.is_dir():
                raise InputError(f"run {settings.name!r} exists; resume it, or give a new run name")
            output.mkdir(parents=True, exist_ok=True)
            line, env = command(settings, spec, output, resume, cpu)
            log = open(output / LOG_FILE, "a", encoding="utf-8")
            shown = "qistudio " + " ".join(shlex.quote(part) for part in line[3:])  # the line a user would type
            log.write(("\n--- resumed ---\n" if resume else "") + shown + "\n")
            log.flush()
            try:
                self.process = subprocess.Popen(
                    line, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                    env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
            finally:
                log.close()  # the child holds its own descriptor
            self.settings, self.stop_requested = settings, False
        return f"{'resumed' if resume else 'started'} {settings.name} (pid {self.process.pid})"

    def stop(self) -> str:
        with self._lock:
            if not self.running:
                return "no run is going"
            self.stop_requested = True
            self.process.send_signal(signal.SIGINT)
            process = self.process
        threading.Timer(STOP_GRACE_SECONDS, lambda: process.poll() is None and process.terminate()).start()
        return f"stopping {self.settings.name}"

    def shutdown(self) -> None:
        """Stop a going run and wait for it (the UI is closing)."""
        if self.stop() != "no run is going":
            try:
                self.process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def state(self) -> str:
        """idle, running, stopping, stopped, finished or failed."""
        if self.process is None:
            return "idle"
        code = self.process.poll()
        if code is None:
            return "stopping" if self.stop_requested else "running"
        if code == 0:
            return "finished"
        return "stopped" if self.stop_requested else "failed"

    def status(self) -> str:
        state = self.state()
        if state == "idle":
            return "no run yet"
        losses = self.losses()
        step = f"step {losses[-1][0]}/{self.settings.max_steps}, loss {losses[-1][1]:.4f}" if losses else "starting"
        line = f"{self.settings.name}: {state} ({step})"
        if state == "failed":
            line += f": {self.last_error()}"
        return line

    def losses(self) -> list[tuple[int, float]]:
        path = None if self.output is None else self.output / "loss.csv"
        if path is None or not path.is_file():
            return []
        with open(path, newline="", encoding="utf-8") as f:
            return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(f)
                    if row.get("step", "").isdigit() and row.get("loss")]

    def samples(self) -> list[tuple[str, str]]:
        """(path, caption) of the validation images, latest step first."""
        folder = None if self.output is None else self.output / "samples"
        if folder is None or not folder.is_dir():
            return []
        steps = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("step-*") if p.name.split("-")[1].isdigit())
        return [(str(image), f"step {step}") for step, path in reversed(steps) for image in sorted(path.glob("*.png"))]

    def log_tail(self, lines: int = 30) -> str:
        path = None if self.output is None else self.output / LOG_FILE
        if path is None or not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 20000))
            text = f.read().decode("utf-8", "replace")
        parts = [part.rstrip() for part in re.split(r"[\r\n]+", text) if part.strip()]
        return "\n".join(parts[-lines:])

    def last_error(self) -> str:
        lines = [line for line in self.log_tail(50).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("qistudio")]
        return (errors or lines or ["no output"])[-1]

    def weights(self) -> list[str]:
        """The LoRA files the run saved, newest first."""
        if self.output is None or not self.output.is_dir():
            return []
        return [str(p) for p in sorted(self.output.glob("*.safetensors"), key=lambda p: p.stat().st_mtime,
                                       reverse=True)]
