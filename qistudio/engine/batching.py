"""Which waiting jobs may share one DiT call, and how many fit a worker's memory.

Design note. A batch is run as one pipe(...) call whose prompts are the jobs' prompts (each repeated for its
images) and whose `noise` is the concatenation of the noise each job's own seed draws (the pipeline's
`_initial_noise`, per job). Every row of that call meets the same computation as it would alone: the text encoder
reads each prompt on its own row (causal, right-padded), the DiT attends each row's own keys only (padding is
sliced away, ops/attention.py), guidance and the Euler step are per element. What must agree across the batch is
therefore everything that is one value per call: size, steps, scheduler, guidance scale and rescale, the negative
prompt, the sigma schedule's inputs, tiling, and the LoRA set with its scales. Jobs with per-call image inputs
(edit images, image-to-image, inpainting, EliGen, ControlNet, context images, Layered's image) run
alone, and so does every Qwen-Image 2.1 job.

Rows agree with the job run alone up to float rounding of batched matrix products (a different GEMM shape may sum
in another order): measured on the CPU demo, latents within 3e-6 and 13 of 393,216 8-bit pixel values one level
apart. `max_batch_images=1` turns batching off where bit-identity matters.
"""

from __future__ import annotations

from dataclasses import dataclass


def batch_key(request, scheduler: str, loras) -> tuple | None:
    """What jobs must share to be batched; None for a job that runs alone."""
    if not hasattr(request, "edit_rows"):
        return None  # Qwen-Image 2.1 (request21.Request21): its prefix cache is per prompt; each job runs alone
    alone = (request.edit_rows, request.entities, request.input_image, request.inpaint_mask, request.context_image,
             request.noise, request.layered)
    if any(value is not None for value in alone) or request.controlnet_inputs:
        return None
    sigmas = None if request.sigmas is None else tuple(request.sigmas)
    tiles = tuple(v if isinstance(v, int) else tuple(v) for v in (request.tile_size, request.tile_stride))
    return (scheduler, request.height, request.width, request.num_inference_steps, request.cfg_scale,
            request.cfg_norm_rescale, request.negative_prompt, sigmas, request.exponential_shift_mu,
            request.denoising_strength, request.zero_cond_t, request.cfg_batch, request.rand_device,
            request.edit_rope_interpolation, request.tiled, tiles, tuple(sorted(loras)))


def rows_and_pixels(request) -> tuple[int, int]:
    """(DiT rows, pixels per row) of a request: guidance doubles the rows when both branches run together."""
    branches = 2 if request.use_cfg and request.cfg_batch else 1
    return request.batch_size * branches, request.height * request.width


@dataclass
class Capacity:
    """How much one worker takes in one call: images, and bytes of activations (None: no memory bound, CPU)."""

    max_images: int
    free_bytes: int | None = None
    bytes_per_row_pixel: float = 0.0  # DiT and VAE activations per pixel of one DiT row

    def cost(self, request) -> float:
        rows, pixels = rows_and_pixels(request)
        return rows * pixels * self.bytes_per_row_pixel

    def fits(self, requests) -> bool:
        if sum(r.batch_size for r in requests) > self.max_images:
            return False
        return self.free_bytes is None or sum(self.cost(r) for r in requests) <= self.free_bytes


def select_batch(waiting: list, capacity: Capacity, key_of, request_of) -> list:
    """The oldest waiting job and the later ones that share its key, in order, while they fit `capacity`.

    The oldest job always goes (alone if need be), so no job waits behind younger ones for ever.
    """
    if not waiting:
        return []
    head = waiting[0]
    chosen = [head]
    key = key_of(head)
    if key is None:
        return chosen
    for job in waiting[1:]:
        if key_of(job) == key and capacity.fits([request_of(j) for j in (*chosen, job)]):
            chosen.append(job)
    return chosen
