"""A worker's memory: what its device has free for batching, and what it uses (for /metrics).

Design note. How many images fit one DiT call is estimated, not searched: after the models are loaded, the free
device memory less a safety margin, divided by the activation bytes one row-pixel needs. Per pixel of one DiT row
(guidance counts two rows) the DiT holds about ACTIVATION_WIDTHS hidden-sized activations per 16x16-pixel token
(block input, q/k/v, attention output, the MLP's 4x-wide hidden and its output, the residual), and the VAE decoder
about VAE_WIDTHS base_dim-wide maps per output pixel. The estimate errs high (fewer images per batch); when a
batch still runs out of memory the worker splits it and halves the budget it reports (runner.py), so the limit
also learns. On the CPU there is no bound but the image count.
"""

from __future__ import annotations

import os

ACTIVATION_WIDTHS = 16  # hidden-sized tensors alive per DiT token in one block, inference
VAE_WIDTHS = 12  # base_dim-wide maps alive per output pixel in the VAE decoder
SAFETY = 0.8  # of the free memory, the part batching may plan with


def bytes_per_row_pixel(pipe) -> float:
    dit, vae = pipe.components.dit, pipe.components.vae
    size = pipe.torch_dtype.itemsize if hasattr(pipe.torch_dtype, "itemsize") else 2
    dit_part = dit.config.dim * ACTIVATION_WIDTHS * size / 256 if dit is not None else 0.0
    vae_part = vae.config.base_dim * VAE_WIDTHS * size if vae is not None else 0.0
    return dit_part + vae_part


def free_bytes(device: str) -> int | None:
    """Free memory batching may use on a CUDA device (None on the CPU: unbounded)."""
    import torch

    if not device.startswith("cuda"):
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free * SAFETY)


def usage(device: str) -> dict[str, int]:
    """Bytes in use: the process's resident host memory, and on a GPU allocated, reserved and peak device memory."""
    report = {"host_resident": _resident_bytes()}
    if device.startswith("cuda"):
        import torch

        index = torch.device(device)
        report.update(device_allocated=torch.cuda.memory_allocated(index),
                      device_reserved=torch.cuda.memory_reserved(index),
                      device_peak=torch.cuda.max_memory_allocated(index))
    return report


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak, where /proc is missing
