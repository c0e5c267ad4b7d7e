"""The processes of a multi-process run: the process group they join, what DDP leaves alone, and how one failing
process ends them all with a message instead of a hang.

Design note. Under `torchrun` or `accelerate launch` every process sees RANK / WORLD_SIZE / LOCAL_RANK.
- Backend. accelerate forms a gloo group on the CPU only when told the run is on the CPU (Accelerator(cpu=True));
  without CUDA and without --device cpu it would leave each worker a one-process run of its own, writing the same
  folder (the first found the other's lock, or both trained alone). So a run without CUDA is a CPU run.
- Timeouts. Every collective waits at most `process_group_timeout` seconds. A process that dies is noticed at once
  by gloo ("Connection closed by peer") and by torchrun's agent, which stops the others with SIGTERM; a process
  that hangs is noticed at the timeout. Either way each survivor raises ProcessGroupError (or RunStopped on
  SIGTERM) naming the last complete checkpoint, from which --resume continues; nothing half-written is published
  (checkpoint.py renames a checkpoint into place only once every process has written its part).
- DDP and frozen tensors. DDP broadcasts every parameter and buffer from rank 0 when it wraps a model and wants
  them all on one device type. The frozen ones (a LoRA's 20B base, streamed blocks resting in host memory, FP8
  weights) are read by every process from the same files, so DDP is told to ignore them
  (`_ddp_params_and_buffers_to_ignore`): no 40 GB broadcast at start, and streamed blocks may stay on the host.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
from typing import Callable

import torch
import torch.nn as nn

from .errors import ProcessGroupError, RunStopped

logger = logging.getLogger(__name__)

# Words of the errors a collective raises when another process died or stopped answering (gloo raises plain
# RuntimeErrors; NCCL and the stores raise torch.distributed.DistError).
PEER_FAILURE_WORDS = ("connection closed by peer", "connection reset", "timed out", "timeout", "broken pipe",
                      "socket closed", "connection refused", "nccl error", "watchdog")


def launched() -> bool:
    """Whether this process is one of several that a launcher started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def on_cpu(device: str | None) -> bool:
    """A run on the CPU: asked for, or no device asked for and no CUDA here."""
    if device is not None:
        return torch.device(device).type == "cpu"
    return not torch.cuda.is_available()


def make_accelerator(device: str | None, timeout_s: int, find_unused_parameters: bool):
    """accelerate's Accelerator for this run: gloo on the CPU, every collective bounded by `timeout_s`."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    group = dict(timeout=datetime.timedelta(seconds=timeout_s))
    if deepspeed_on_cpu(device):
        group["backend"] = "gloo"  # accelerate finds no backend of its own for DeepSpeed without CUDA
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters),
                InitProcessGroupKwargs(**group)]
    return Accelerator(cpu=on_cpu(device) and not deepspeed_on_cpu(device), kwargs_handlers=handlers)


def deepspeed_on_cpu(device: str | None) -> bool:
    """`accelerate launch` with a DeepSpeed config on a machine without CUDA (DeepSpeed's CPU accelerator, gloo):
    accelerate's cpu flag would switch DeepSpeed off."""
    using = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    return using and (torch.device(device).type == "cpu" if device else not torch.cuda.is_available())


def ensure_process_group(device: torch.device, timeout_s: int) -> None:
    """A process group for FSDP2 even in a run without a launcher: one process on its own (a store in memory)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=timeout_s))


def ignore_frozen(model: nn.Module) -> list[str]:
    """Tell DDP to leave `model`'s frozen parameters and its buffers alone (see the design note); returns them."""
    names = [name for name, p in model.named_parameters() if not p.requires_grad]
    names += [name for name, _ in model.named_buffers()]
    model._ddp_params_and_buffers_to_ignore = names
    return names


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` comes from a collective whose other side died or stopped answering."""
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(error, dist_error):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(word in text for word in PEER_FAILURE_WORDS)


@contextlib.contextmanager
def failures_explained(rank: int, timeout_s: int, checkpoint_note: Callable[[], str]):
    """Turn a collective's failure into ProcessGroupError and torchrun's SIGTERM into RunStopped, each naming the
    last complete checkpoint. The SIGTERM handler is this process's while the block runs (main thread only).

    Once either error is raised the process is on its way out, and torchrun's SIGTERM (sent to every process when
    one dies) may still be coming: from then on SIGTERM is ignored, so that its default action cannot end the
    process before the error naming the checkpoint is printed (a process killed by SIGTERM prints nothing)."""
    handler_installed = launched() and _main_thread()
    previous = None
    if handler_installed:
        def stop(signum, frame):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise RunStopped(f"process {rank} was stopped (SIGTERM: the launcher stops every process once one "
                             f"fails; see the first error above). {checkpoint_note()}")

        previous = signal.signal(signal.SIGTERM, stop)
    failed = False
    try:
        yield
    except RunStopped:
        failed = True
        raise
    except RuntimeError as e:
        if not launched() or not is_peer_failure(e):
            raise
        failed = True
        first_line = " ".join(str(e).split())[:300]
        what = (f"did not answer within {timeout_s} s" if "time" in first_line.lower() else "died")
        raise ProcessGroupError(f"process {rank}: another process of this run {what} ({first_line}). "
                                f"{checkpoint_note()}") from None
    finally:
        if handler_installed:
            signal.signal(signal.SIGTERM, signal.SIG_IGN if failed else previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
