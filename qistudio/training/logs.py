"""Training logs on the main process: TensorBoard scalars and images, and a CSV of step, loss, lr and time.

  --enable_tensorboard_log  output_path/tensorboard_log (the reference's folder): train/loss, train/lr,
                            train/steps_per_second, train/peak_memory_gib (CUDA) and the validation images as
                            samples/NN; needs the tensorboard package (torch.utils.tensorboard writes the files)
  --enable_csv_log          output_path/loss.csv with the columns step, loss, lr (the rate the step used), time
                            (Unix time when the step finished)
A resumed run continues both: the CSV loses its rows after the checkpoint's step (the killed run's steps that
are done again) and TensorBoard purges its events after that step.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .config import TrainConfig
from .outputs import write_text_atomic

TENSORBOARD_DIR = "tensorboard_log"
CSV_FILE = "loss.csv"
CSV_COLUMNS = ("step", "loss", "lr", "time")


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter, or a clear ImportError (called before any model loads)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("--enable_tensorboard_log needs TensorBoard, which is not installed: pip install "
                          "'qistudio[tensorboard]' (or pip install tensorboard; or leave the flag out: "
                          "--enable_csv_log needs nothing)") from None
    return SummaryWriter


class TrainingLog:
    """The per-step record of a run; `start_step` is the step it starts (or resumes) after."""

    def __init__(self, config: TrainConfig, start_step: int):
        output = Path(config.output_path)
        self.tensorboard = None
        if config.enable_tensorboard_log:
            self.tensorboard = summary_writer_class()(log_dir=str(output / TENSORBOARD_DIR), purge_step=start_step + 1)
        self.csv_file = None
        if config.enable_csv_log:
            path = output / CSV_FILE
            _keep_rows_up_to(path, start_step)
            self.csv_file = open(path, "a", newline="", encoding="utf-8")
            self.csv = csv.writer(self.csv_file, lineterminator="\n")

    def step(self, step: int, loss: float, lr: float, seconds: float, peak_memory: int | None) -> None:
        """One optimizer step: its mean loss, learning rate, wall time, and the device's peak memory in bytes."""
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("train/loss", loss, step)
            self.tensorboard.add_scalar("train/lr", lr, step)
            if seconds > 0:
                self.tensorboard.add_scalar("train/steps_per_second", 1.0 / seconds, step)
            if peak_memory is not None:
                self.tensorboard.add_scalar("train/peak_memory_gib", peak_memory / 2**30, step)
        if self.csv_file is not None:
            self.csv.writerow([step, repr(loss), repr(lr), f"{time.time():.3f}"])
            self.csv_file.flush()

    def images(self, step: int, images: list[Image.Image]) -> None:
        if self.tensorboard is not None:
            for index, image in enumerate(images):
                self.tensorboard.add_image(f"samples/{index:02d}", np.asarray(image.convert("RGB")), step,
                                           dataformats="HWC")

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.csv_file is not None:
            self.csv_file.close()


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Start or trim the CSV: the header, then only the rows of steps <= `step` (rewritten atomically)."""
    rows = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows([r.get(c, "") for c in CSV_COLUMNS] for r in rows)
    write_text_atomic(path, out.getvalue())
