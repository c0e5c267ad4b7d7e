"""Start N local ranks running one function, as torchrun would: torch.distributed's elastic launcher, in-process.

Each rank is a spawned process with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), so
the code it runs is the code a `torchrun --nproc_per_node N` script runs. If any rank fails or dies, the launcher
stops the others and this raises ParallelError with the first failure's message.
"""

from __future__ import annotations

import logging
import os
import uuid
from contextlib import contextmanager

from .collectives import ParallelError

_NOISY_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing")


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextmanager
def _quiet_launcher():
    """The launcher logs every stop and failure at length; ParallelError says what matters in one line."""
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def launch(fn, args: tuple, nprocs: int, threads_per_rank: int | None = None) -> dict[int, object]:
    """Run fn(*args) on `nprocs` local ranks; returns {rank: fn's return value}. fn must be importable by name
    (a module-level function), as the ranks are spawned processes."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if threads_per_rank is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads_per_rank)  # inherited by the ranks, as torchrun sets it
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    try:
        with _quiet_launcher():
            return elastic_launch(config, fn)(*args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        raise ParallelError(f"rank {rank} failed: {_failure_message(failure)}") from None


def _failure_message(failure) -> str:
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    if not message or message == "<N/A>":
        return f"exited with code {failure.exitcode} (signal or crash: its output above says more)"
    return " ".join(str(message).split())
