"""Qwen-Image 2.1 generation: encode -> prefill the prefix -> sample the target -> decode to RGBA.

Design note. `QwenImagePipeline.from_pretrained` (the seed's front door) returns a `QwenImage21Pipeline` when the
loaded DiT is Qwen-Image 2.1's: a subclass, so loading, LoRA, VRAM management and compile are the same object's,
while the call is 2.1's own. It differs in what it takes (one flat list of 1-10 edit images shared by every prompt,
`output_resolution`, `use_kv_cache`), in its defaults (40 steps, no guidance) and in how it runs: the DiT reads a
prefix (text states with the condition images' latent tokens in their vision slots) and the target, and the prefix
is computed once per prompt (models/dit21.py `prefill`) and served to every step, with `use_kv_cache=True` (the
default); `use_kv_cache=False` computes it again at every step, as the reference's uncached path does. Results are
equal either way. Each prompt (and the negative prompt) has its own prefix, so the rows of one prompt share one
prefix and prompts never pad each other (the reference pads a batch of prompts to one length, which shifts the
shorter prompts' target positions; one prompt per call matches it exactly).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .components import Components
from .conditioning.qwen21 import PromptPrefix, encode_prompt, rgba_tensor
from .imageio import tensor_to_images
from .models.dit21 import PrefixCache, QwenImage21DiT
from .models.layout21 import ImageBlock, JointLayout
from .parallel.qwen21 import Call, encode_once21
from .pipeline import QwenImagePipeline
from .request21 import DEFAULT_RESOLUTION, Request21, build_request21
from .sampling.guidance import guide
from .sampling.sampler import sample_euler
from .sampling.schedule import FlowMatchScheduler, custom_sigmas
from .tokenizer_build21 import QWEN3_VL_IMAGE_PROCESSOR
from .validation import InputError


def is_qwen21(components: Components) -> bool:
    return isinstance(components.dit, QwenImage21DiT)


def pipeline_class(cls: type, components: Components) -> type:
    """The pipeline class for loaded components: Qwen-Image 2.1's subclass when its DiT is loaded."""
    return QwenImage21Pipeline if cls is QwenImagePipeline and is_qwen21(components) else cls


def processor21(components: Components):
    """Qwen3-VL's processor: the loaded one, else one built from the tokenizer with Qwen3-VL's image settings."""
    processor = components.processor
    if processor is not None:
        patch = getattr(getattr(processor, "image_processor", None), "patch_size", None)
        if patch != QWEN3_VL_IMAGE_PROCESSOR["patch_size"]:
            raise InputError(f"the loaded processor has {patch}-pixel patches, not Qwen3-VL's 16: load Qwen-Image "
                             "2.1's processor (processor_config=ModelConfig(model_id='Qwen/Qwen-Image-2.1', "
                             "origin_file_pattern='processor/'))")
        return processor
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    components.require("tokenizer")
    warnings.warn("no processor_config was given; Qwen-Image 2.1 reads prompts and edit images with Qwen3-VL's "
                  "image processor settings and the loaded tokenizer", stacklevel=3)
    settings = {k: v for k, v in QWEN3_VL_IMAGE_PROCESSOR.items() if k not in ("image_processor_type", "processor_class")}
    components.processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**settings),
                                            tokenizer=components.tokenizer, video_processor=Qwen3VLVideoProcessor())
    return components.processor


@dataclass
class PromptRows:
    """The rows of the batch that one prompt makes, and its (and the negative prompt's) prefix."""

    rows: slice
    positive: PromptPrefix
    negative: PromptPrefix | None


class Prefixes:
    """Each prefix's K/V cache: made at its first use and kept for every step when the DiT allows (causal_condition
    and use_kv_cache), else made again at every step."""

    def __init__(self, dit: QwenImage21DiT, condition: torch.Tensor | None, target: ImageBlock, keep: bool):
        self.dit, self.condition, self.target = dit, condition, target
        self.keep = keep and dit.config.causal_condition
        self.kept: dict[int, PrefixCache] = {}

    def cache(self, prefix: PromptPrefix, timestep: torch.Tensor) -> PrefixCache:
        if id(prefix) in self.kept:
            return self.kept[id(prefix)]
        layout = JointLayout(prefix.runs, self.target)
        step_timestep = None if self.dit.config.causal_condition else timestep[:1]
        cache = self.dit.prefill(prefix.text_states, self.condition, layout, step_timestep)
        if self.keep:
            self.kept[id(prefix)] = cache
        return cache


def make_velocity21(dit: QwenImage21DiT, request: Request21, groups: list[PromptRows], prefixes: Prefixes,
                    split=None):
    """velocity(x, sigma, step) over latents (B, C, h, w): each prompt's rows against its prefix, guided. The
    step's DiT calls (each prompt's positive, then each one's negative) run here, or through `split`, a parallel
    run's qistudio.parallel.qwen21.CallSplit (each rank its share; every call's output on every rank)."""

    def run(prefix: PromptPrefix):
        return lambda tokens, timestep: dit(tokens, timestep, prefixes.cache(prefix, timestep))

    calls = [Call(0, group.rows, run(group.positive)) for group in groups]
    calls += [Call(1, group.rows, run(group.negative)) for group in groups if group.negative is not None]

    def velocity(x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major: the target block's order
        timestep = torch.full((tokens.shape[0],), sigma, device=x.device, dtype=torch.float32)
        with torch.no_grad():
            if split is None:
                outputs = [call.fn(tokens[call.rows], timestep[call.rows]) for call in calls]
            else:
                outputs = split(calls, tokens, timestep)
        out = []
        for index, group in enumerate(groups):
            cond = outputs[index]
            if group.negative is not None:
                cond = guide(cond, outputs[len(groups) + index], request.cfg_scale, False)
            out.append(cond)
        return torch.cat(out).transpose(1, 2).reshape(x.shape)

    return velocity


def _noise(request: Request21, channels: int, dtype, device) -> torch.Tensor:
    shape = (request.batch_size, channels, *request.latent_size)
    if request.noise is not None:
        if request.noise.shape[1] != channels:
            raise InputError(f"noise must have {channels} channels (the VAE's latent channels), got "
                             f"{tuple(request.noise.shape)}")
        return request.noise.to(device=device, dtype=dtype)
    generator = torch.Generator(request.rand_device).manual_seed(request.seed)
    return torch.randn(shape, generator=generator, device=request.rand_device, dtype=dtype).to(device)


def _condition_tokens(components: Components, request: Request21, device, dtype) -> torch.Tensor | None:
    """The condition images' latent tokens (1, N, C), image after image, each row-major."""
    if not request.edit_images:
        return None
    tiling = (request.tiled, request.tile_size, request.tile_stride)
    with torch.no_grad():
        latents = [components.vae.encode(rgba_tensor(image, device, dtype), *tiling) for image in request.edit_images]
    return torch.cat([lat.flatten(2).transpose(1, 2) for lat in latents], dim=1).to(dtype)


def generate_latents21(components: Components, request: Request21, device, dtype,
                       scheduler: FlowMatchScheduler | None = None, parallel=None) -> torch.Tensor:
    """The denoised latents (B, C, height/16, width/16) of a request; with `parallel` (a
    parallel.runtime.ParallelRuntime), this rank's part of a parallel run: the text encoded on rank 0 and broadcast,
    the DiT calls split (parallel/qwen21.py), the same latents on every rank."""
    components.require("dit", "text_encoder", *(("vae",) if request.edit_images else ()))
    processor = processor21(components)
    dit, split = components.dit, None
    if parallel is not None:
        dit, split = parallel.qwen21(dit, request.use_cfg)
        request.seed = parallel.broadcast_seed(request.seed)  # one noise for every rank
        if not parallel.is_main:
            request.progress_bar_cmd = lambda steps: steps
    h, w = request.latent_size
    if request.sigmas is not None:
        sigmas = custom_sigmas(request.sigmas)
    else:
        sigmas = (scheduler or FlowMatchScheduler()).sigmas(request.num_inference_steps, h * w)
    noise = _noise(request, dit.config.in_channels, dtype, device)
    def encode():
        positives = encode_prompt(components.text_encoder, processor, request.prompts, request.edit_images, device,
                                  dtype)
        negative = None
        if request.use_cfg:
            negative = encode_prompt(components.text_encoder, processor, [request.negative_prompt],
                                     request.edit_images, device, dtype)[0]
        return positives, negative

    with components.phase("text encoding", "text_encoder"):
        positives, negative = encode() if parallel is None else encode_once21(parallel, encode, PromptPrefix)
    with components.phase("image encoding", "vae"):
        condition = _condition_tokens(components, request, device, dtype)
    groups = [PromptRows(slice(k * request.num_images, (k + 1) * request.num_images), positive, negative)
              for k, positive in enumerate(positives)]
    with components.phase("denoising", "dit"):
        prefixes = Prefixes(dit, condition, ImageBlock(h, w), request.use_kv_cache)
        velocity = make_velocity21(dit, request, groups, prefixes, split)
        return sample_euler(velocity, noise, sigmas, callback=request.callback, progress=request.progress_bar_cmd)


def decode21(components: Components, request: Request21, latents: torch.Tensor):
    """RGBA PIL images of the latents."""
    components.require("vae")
    with components.phase("decoding", "vae"), torch.no_grad():
        images = components.vae.decode(latents, request.tiled, request.tile_size, request.tile_stride)
    return tensor_to_images(images)


class QwenImage21Pipeline(QwenImagePipeline):
    """Qwen-Image 2.1: text-to-image and editing with 1-10 images, RGBA out. Made by `QwenImagePipeline.from_pretrained`
    when the loaded DiT is 2.1's; see the module note."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | None = "",
        cfg_scale: float = 1.0,
        edit_image=None,
        height: int | None = None,
        width: int | None = None,
        output_resolution: int = DEFAULT_RESOLUTION,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int = 40,
        sigmas: list[float] | None = None,
        use_kv_cache: bool = True,
        num_images: int = 1,
        noise: torch.Tensor | None = None,
        tiled: bool = False,
        tile_size: int | tuple = 16,
        tile_stride: int | tuple = 12,
        progress_bar_cmd=tqdm,
        callback=None,
        output_type: str = "pil",
    ):
        """Generate; returns an RGBA PIL image (a list for several; latents with output_type="latent").

        edit_image: one image or a list of 1-10 (PIL or paths, alpha kept), shared by every prompt; each is resized
        to its aspect at output_resolution^2 pixels (multiples of 32). height/width: default the last edit image's
        aspect at output_resolution^2 pixels, else output_resolution square; floored to multiples of 32.
        Guidance runs when cfg_scale != 1 and negative_prompt is not None (2.1 is meant to run without: cfg 1).
        use_kv_cache: compute the text and condition tokens' keys and values once for all steps (equal results).
        sigmas: used as given (a final 0 appended); tile sizes are in latent pixels (16 pixels each).
        """
        if output_type not in ("pil", "latent"):
            raise InputError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        request = build_request21(
            prompt, edit_image=edit_image, output_resolution=output_resolution, use_kv_cache=use_kv_cache,
            negative_prompt=negative_prompt, cfg_scale=cfg_scale, height=height, width=width, seed=seed,
            rand_device=rand_device, num_inference_steps=num_inference_steps, sigmas=sigmas, num_images=num_images,
            noise=noise, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride, progress_bar_cmd=progress_bar_cmd,
            callback=callback,
        )
        self.last_request = request
        if self._plan_on_first_call:
            self.enable_vram_management()
        try:
            latents = generate_latents21(self.components, request, self.device, self.torch_dtype, self.scheduler,
                                         self.parallel)
            if output_type == "latent":
                return latents
            if self.parallel is not None and not self.parallel.is_main:
                return None  # rank 0 decodes and returns the images
            images = decode21(self.components, request, latents)
        finally:
            if self.components.memory is not None:
                self.components.memory.release()
        return images[0] if len(images) == 1 else images

    def enable_parallelism(self, degrees: str | dict | None = "auto", *, data: int | None = None,
                           cfg: int | None = None, ulysses: int | None = None, ring: int | None = None,
                           timeout: float = 300.0):
        """As QwenImagePipeline.enable_parallelism, for 2.1: `cfg` (with guidance, the positive and negative calls
        on different ranks), `data` (the batch's images), `ulysses` (the target's tokens; it must divide the
        model's 32 heads; each rank keeps the prefix K/V cache of its heads only) and `ring` (the target's tokens,
        any count; with ulysses, Ulysses within each ring position). "auto" gives calls without guidance (2.1's
        default) Ulysses over every rank, ring for what the heads do not divide. Afterwards pipe(...) returns the
        images on rank 0 and None on every other rank (output_type="latent": the same latents on every rank)."""
        from .parallel.runtime import enable_parallelism

        self.components.require("dit")
        given = {name: value for name, value in dict(data=data, cfg=cfg, ulysses=ulysses, ring=ring).items()
                 if value is not None}
        self.parallel = enable_parallelism(self.device, self.components.dit.config.num_heads, given or degrees,
                                           timeout)
        return self.parallel.degrees
