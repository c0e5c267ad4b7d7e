"""Inside a worker: run one batch of jobs as one pipe(...) call, reporting progress, previews and results.

A batch of one is exactly `pipe(**arguments)`. A larger batch (jobs that batching.batch_key says may share a call)
is one `pipe(...)` whose prompts are the jobs' prompts, each repeated for its images, with `noise` the
concatenation of the noise each job's own seed draws, so every image is the one its job would get alone (see
batching.py for the rounding caveat). Cancellation acts at the next step: the per-step callback raises
JobCancelled once every job of the batch is cancelled; a job cancelled inside a larger batch rides along and its
images are dropped. A batch that runs out of device memory is split and its jobs run one by one.

A worker may hold a second pipeline (a Qwen-Image-Layered model served beside the main one, loaded on its first
job): each task names the pipeline it runs on, and every pipeline keeps its own LoRA slots. A layers job's images
are its RGBA layers, bottom first (for several prompts or num_images, each row's layers in turn); its previews show
the composite frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .control import with_control_inputs
from .device_memory import usage
from .spec import MAIN


class JobCancelled(Exception):
    """Raised from the per-step callback to stop a batch whose jobs were all cancelled."""


@dataclass
class Task:
    id: str
    arguments: dict  # pipe(...)'s keyword arguments, images as PIL
    scheduler: str
    loras: list  # (name, scale) pairs
    lora_paths: dict  # name -> file
    pipeline: str = MAIN  # spec.MAIN, or spec.LAYERED_PIPELINE


def message_of(error: BaseException) -> str:
    """An exception's message on one line (its type when it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def _is_out_of_memory(error: BaseException) -> bool:
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError) if k)
    return isinstance(error, kinds)


class BatchRunner:
    """Runs batches on one pipeline; `send(message)` reports to the engine, `control` says what was cancelled."""

    def __init__(self, pipe, device: str, control, send, loras, previewer=None, preview_every: int = 1,
                 other_pipelines=None):
        """`other_pipelines(name)`: the (pipe, LoRASlots) of a task's non-main pipeline (loaded when first asked)."""
        self.main, self.device, self.control, self.send = (pipe, loras), device, control, send
        self.pipe, self.loras = pipe, loras  # the batch's pipeline and its LoRA slots (the main one between batches)
        self.previewer, self.preview_every = previewer, preview_every
        self.other_pipelines = other_pipelines
        self._schedulers: dict = {}

    def _use(self, name: str) -> None:
        if name == MAIN:
            self.pipe, self.loras = self.main
        elif self.other_pipelines is None:
            raise RuntimeError(f"this worker holds no {name} pipeline")
        else:
            self.pipe, self.loras = self.other_pipelines(name)

    def run(self, tasks: list[Task]) -> None:
        """Run the batch; every task ends in exactly one message: result, failed or cancelled."""
        start = time.perf_counter()
        try:
            self._use(tasks[0].pipeline)
            self.pipe.scheduler = self._scheduler(tasks[0].scheduler)
            self.loras.activate(tasks[0].loras, tasks[0].lora_paths)
            images = self._generate(tasks)
        except JobCancelled:
            for task in tasks:
                self.send({"type": "cancelled", "job": task.id})
            return
        except Exception as error:  # noqa: BLE001  (any failure is reported for its jobs; the worker lives on)
            if _is_out_of_memory(error) and len(tasks) > 1:
                self._split_after_oom(tasks)
                return
            self._fail(tasks, error)
            return
        seconds = time.perf_counter() - start
        for task, task_images in zip(tasks, images):
            if task.id in self.control.cancelled:
                self.send({"type": "cancelled", "job": task.id})
                continue
            self.send({"type": "result", "job": task.id, "seconds": seconds, "device": self.device,
                       "dtype": str(self.pipe.torch_dtype).removeprefix("torch."),
                       "images": [[im.mode, im.width, im.height, im.tobytes()] for im in task_images]})

    def _split_after_oom(self, tasks: list[Task]) -> None:
        torch.cuda.empty_cache()
        self.send({"type": "capacity", "shrink": 0.5})  # the engine halves this worker's batching budget
        for task in tasks:
            self.run([task])

    def _fail(self, tasks: list[Task], error: BaseException) -> None:
        if _is_out_of_memory(error):
            torch.cuda.empty_cache()
            size = f"{tasks[0].arguments.get('width')}x{tasks[0].arguments.get('height')}"
            message, code, user = (f"out of device memory at {size}; ask for fewer or smaller images",
                                   "out_of_memory", True)
        else:
            # A ValueError is a value the caller gave (InputError, LoRAError, a LoRA that does not fit the model).
            user = isinstance(error, ValueError)
            message, code = message_of(error), ("invalid_value" if user else "worker_error")
        for task in tasks:
            self.send({"type": "failed", "job": task.id, "error": message, "code": code, "user": user})

    def _generate(self, tasks: list[Task]) -> list[list]:
        """The images of each task, in order."""
        steps = _StepReporter(self, tasks)
        common = dict(callback=steps.callback, progress_bar_cmd=steps.progress)
        if len(tasks) == 1:
            return [_flat(self.pipe(**with_control_inputs(tasks[0].arguments), **common))]
        from ..pipeline import _initial_noise  # the pipeline's own noise rule, so each job's seed draws its noise
        from ..request import build_request

        requests = [build_request(**task.arguments) for task in tasks]
        noise = torch.cat([_initial_noise(r, self.pipe.torch_dtype, self.pipe.device) for r in requests])
        prompts = [prompt for r in requests for prompt in r.prompts for _ in range(r.num_images)]
        merged = {**tasks[0].arguments, "prompt": prompts, "num_images": 1, "noise": noise, "seed": None}
        images = self.pipe(**merged, **common)
        images = images if isinstance(images, list) else [images]
        out, start = [], 0
        for r in requests:
            out.append(images[start:start + r.batch_size])
            start += r.batch_size
        return out

    def _scheduler(self, name: str):
        from ..sampling.schedule import FlowMatchScheduler

        if name not in self._schedulers:
            self._schedulers[name] = FlowMatchScheduler(name)
        return self._schedulers[name]


class _StepReporter:
    """The per-step callback of one batch: progress, previews, cancellation checks."""

    def __init__(self, runner: BatchRunner, tasks: list[Task]):
        self.runner, self.tasks = runner, tasks
        self.total, self.last = 0, time.perf_counter()
        # The first latent row of each task in the batch.
        self.rows, row = [], 0
        for task in tasks:
            self.rows.append(row)
            row += _rows(task.arguments)

    def progress(self, steps):
        self.total, self.last = len(steps), time.perf_counter()  # called as sampling starts
        return steps

    def callback(self, step: int, sigma: float, latents: torch.Tensor) -> None:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        runner = self.runner
        runner.control.poll()
        active = [t for t in self.tasks if t.id not in runner.control.cancelled]
        if not active:
            raise JobCancelled()
        done = step + 1
        previews = {}
        every = runner.preview_every
        if runner.previewer is not None and every and (done % every == 0 or done == self.total):
            for task, row in zip(self.tasks, self.rows):
                if task in active:
                    latent = latents[row]  # (C, h, w); a layers job's (frames, C, h, w): frame 0, the composite
                    previews[task.id] = runner.previewer.png(latent[0] if latent.ndim == 4 else latent)
        runner.send({"type": "progress", "jobs": [t.id for t in active], "step": done, "total": self.total,
                     "seconds": seconds, "images": sum(_rows(t.arguments) for t in self.tasks),
                     "previews": previews, "memory": usage(runner.device)})


def _rows(arguments: dict) -> int:
    prompt = arguments.get("prompt")
    prompts = len(prompt) if isinstance(prompt, (list, tuple)) else 1  # None: a layers job's caption
    return prompts * arguments.get("num_images", 1)


def _flat(images) -> list:
    """pipe(...)'s result as one list of images: an image, a list, or a list of lists (layers per row)."""
    if not isinstance(images, list):
        return [images]
    return [image for item in images for image in (item if isinstance(item, list) else [item])]
