"""Layered generation: an RGBA image -> N RGBA layers, with the one DiT, sampler and VAE (Qwen-Image-Layered).

The phases are the pipeline's (text, image, denoising, decoding; each under VRAM management's phase), with what
Layered does differently: an empty prompt is replaced by a caption the text encoder writes of the image
(conditioning/caption.py); the latents are layers + 1 frames denoised as one sequence after which the input
image's tokens follow (conditioning/layered.py); the schedule is Layered's own (sampling/layered_schedule.py); the
first frame (the composite) is dropped and every layer decoded to RGBA. Guidance is plain CFG unless
cfg_norm_rescale (diffusers' cfg_normalize, off by default for Layered). Step caching (cache=) gates the DiT's blocks
as for Qwen-Image, per guidance branch, over the whole sequence (frames and the input image's tokens).

Under parallelism (`parallel`, a parallel.runtime.ParallelRuntime) a call runs as Qwen-Image's does
(pipeline.generate_latents): the caption and the text encoding once, on rank 0, broadcast; the DiT split by
ShardedDiT (rows over data x cfg; the image tokens, all frames then the input image's, over ulysses x ring with
their layer-3D RoPE rows; the extra timestep condition is per row); rank 0 decodes, the other ranks get None.
"""

from __future__ import annotations

import torch

from .caching import start_cache
from .components import Components
from .conditioning.caption import caption_image
from .conditioning.layered import layered_rotary, pack_frames, rgba_tensor, unpack_frames
from .conditioning.prompt import concat_text_states, encode_prompts
from .imageio import tensor_to_images
from .models.text_encoder import TextStates
from .ops.packing import patchify
from .sampling.guidance import guide
from .sampling.layered_schedule import layered_sigmas
from .sampling.sampler import sample_euler
from .sampling.schedule import custom_sigmas
from .validation import InputError

EMPTY_PROMPTS = ("", " ")  # the reference captions these (and None)
# diffusers' QwenImageLayeredPipeline keeps 512 text tokens (its max_sequence_length), where Qwen-Image's own
# pipelines read up to 1024; a caption can reach that (512 new tokens plus the template's end).
MAX_TEXT_TOKENS = 512


def require_layered_models(components: Components) -> None:
    """Fail before any model runs unless a Layered DiT and an RGBA VAE are loaded."""
    components.require("dit", "vae", "text_encoder")
    if not components.dit.config.use_layer3d_rope:
        raise InputError("layers= needs Qwen-Image-Layered's DiT (its checkpoint has time_text_embed."
                         "addition_t_embedding); load ModelConfig(model_id='Qwen/Qwen-Image-Layered', "
                         "origin_file_pattern='transformer/diffusion_pytorch_model*.safetensors')")
    if components.vae.config.image_channels != 4:
        raise InputError(f"layers= needs Qwen-Image-Layered's RGBA VAE (4 image channels); the loaded VAE has "
                         f"{components.vae.config.image_channels}: load ModelConfig(model_id='Qwen/Qwen-Image-Layered',"
                         " origin_file_pattern='vae/diffusion_pytorch_model.safetensors')")


def layered_prompts(components: Components, request, device, dtype) -> list[str]:
    """The prompts, an empty one replaced by the caption the text encoder writes of the image (written once)."""
    if not any(p in EMPTY_PROMPTS for p in request.prompts):
        return request.prompts
    layered = request.layered
    caption = caption_image(components.text_encoder, components.edit_processor(), components.files["text_encoder"],
                            layered.image, layered.use_en_prompt, device, dtype)
    request.extras["caption"] = caption
    return [caption if p in EMPTY_PROMPTS else p for p in request.prompts]


def _repeat(states: TextStates, times: int) -> TextStates:
    if times == 1:
        return states
    return TextStates(states.states.repeat_interleave(times, dim=0), [n for n in states.lengths for _ in range(times)])


def _tiling(components: Components, request) -> tuple:
    tiled = request.tiled or (components.memory is not None and components.memory.tiled_vae)
    return tiled, request.tile_size, request.tile_stride


def _noise(request, dtype, device) -> torch.Tensor:
    if request.noise is not None:
        return request.noise.to(device=device, dtype=dtype)
    generator = torch.Generator(request.rand_device).manual_seed(request.seed)
    shape = (request.batch_size, request.layered.frames, 16, *request.latent_size)
    return torch.randn(shape, generator=generator, device=request.rand_device, dtype=dtype).to(device)


def layered_velocity(components: Components, request, positive: TextStates, negative: TextStates | None,
                     condition: torch.Tensor, cache=None, parallel=None):
    """velocity(x, sigma, step) over latents (B, F, 16, h, w); the input image's tokens (1, N, 64) follow. `cache`
    (caching.start_cache) may skip DiT work, deciding per guidance branch; `parallel` splits each DiT call across
    ranks (every rank gets the whole call's velocity)."""
    dit = components.dit
    model = dit if parallel is None else parallel.dit(dit)
    frames, (h, w) = request.layered.frames, request.latent_size
    batched = negative is not None and request.cfg_batch
    text = concat_text_states([positive, negative]) if batched else positive

    def call(states: TextStates, tokens: torch.Tensor, timestep: torch.Tensor, gate=None) -> torch.Tensor:
        rotary = layered_rotary(frames, (h, w), states.states.shape[1], dit.config.axes_dim, tokens.device)
        joined = torch.cat([tokens, condition.to(tokens.dtype).expand(tokens.shape[0], -1, -1)], dim=1)
        return model(joined, states.states, timestep, rotary, states.lengths, num_target_tokens=tokens.shape[1],
                     block_gate=gate)

    def run(step: int, branches: tuple[str, ...], states: TextStates, tokens, timestep) -> torch.Tensor:
        if cache is None:
            return call(states, tokens, timestep)
        return cache.forward(step, branches, lambda gate: call(states, tokens, timestep, gate))

    def velocity(x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        tokens = pack_frames(x)  # (B, F N, 64)
        timestep = torch.full((tokens.shape[0],), sigma, device=x.device, dtype=torch.float32)
        with torch.no_grad():
            if batched:
                cond, uncond = run(step, ("cond", "uncond"), text, torch.cat([tokens, tokens]),
                                   timestep.repeat(2)).chunk(2)
            else:
                cond = run(step, ("cond",), positive, tokens, timestep)
                uncond = None if negative is None else run(step, ("uncond",), negative, tokens, timestep)
        if uncond is not None:
            cond = guide(cond, uncond, request.cfg_scale, request.cfg_norm_rescale)
        return unpack_frames(cond, frames, h, w)

    return velocity


def encode_layered_text(components: Components, request, device, dtype) -> tuple[TextStates, TextStates | None]:
    """Positive states for every row, negative ones when guidance is on (an empty prompt captioned first)."""
    tokenizer = components.prompt_tokenizer()
    prompts = layered_prompts(components, request, device, dtype)
    positive = _repeat(encode_prompts(components.text_encoder, tokenizer, prompts, device, dtype,
                                      max_length=MAX_TEXT_TOKENS), request.num_images)
    negative = None
    if request.use_cfg:
        negative = _repeat(encode_prompts(components.text_encoder, tokenizer, [request.negative_prompt] *
                                          len(prompts), device, dtype, max_length=MAX_TEXT_TOKENS),
                           request.num_images)
    return positive, negative


def _encode_text(components: Components, request, device, dtype, parallel):
    if parallel is None:
        return encode_layered_text(components, request, device, dtype)
    # Once, on rank 0 (the caption too: generating it is most of this phase), states and caption broadcast.
    states = parallel.encode_once(lambda: encode_layered_text(components, request, device, dtype))
    caption = parallel.broadcast_value(request.extras.get("caption"), "caption broadcast")
    if caption is not None:
        request.extras["caption"] = caption
    return states


def generate_layer_latents(components: Components, request, device, dtype, parallel=None) -> torch.Tensor:
    """The denoised latents (B, layers + 1, 16, h, w); frame 0 is the composite. With `parallel`, this rank's part
    of a parallel run (every rank ends with the same latents)."""
    require_layered_models(components)
    if parallel is not None:
        parallel.prepare(request)
    cache = start_cache(request.cache, components.dit.config.num_layers)
    request.extras["step_cache"] = None if cache is None else cache.log  # for last_cache_report: no tensors kept
    h, w = request.latent_size
    if request.sigmas is not None:
        sigmas = custom_sigmas(request.sigmas)
    else:
        sigmas = layered_sigmas(request.num_inference_steps, (h // 2) * (w // 2), request.exponential_shift_mu)
    noise = _noise(request, dtype, device)
    with components.phase("text encoding", "text_encoder"):
        positive, negative = _encode_text(components, request, device, dtype, parallel)
    with components.phase("image encoding", "vae"), torch.no_grad():
        image = rgba_tensor(request.layered.image, device, dtype)
        condition = patchify(components.vae.encode(image, *_tiling(components, request)).to(dtype))
    with components.phase("denoising", "dit"):
        velocity = layered_velocity(components, request, positive, negative, condition, cache, parallel)
        return sample_euler(velocity, noise, sigmas, callback=request.callback, progress=request.progress_bar_cmd)


def decode_layers(components: Components, request, latents: torch.Tensor, share=None) -> list[list] | None:
    """Per batch row, its layers as RGBA images (the composite frame 0 dropped), bottom layer first. `share`
    splits the VAE's tiles across ranks (None where a rank keeps nothing)."""
    batch, frames = latents.shape[:2]
    with components.phase("decoding", "vae"), torch.no_grad():
        images = components.vae.decode(latents[:, 1:].flatten(0, 1), *_tiling(components, request), share=share)
    if images is None:
        return None
    pictures = tensor_to_images(images)
    return [pictures[row * (frames - 1): (row + 1) * (frames - 1)] for row in range(batch)]


def generate_layers(components: Components, request, device, dtype, output_type: str = "pil", parallel=None):
    """Layers of the request's image: a list of RGBA images (a list of such lists for several rows), or the
    latents (B, layers + 1, 16, h, w) with output_type="latent". With `parallel`, rank 0 returns the layers and
    every other rank None (the latents on every rank)."""
    latents = generate_layer_latents(components, request, device, dtype, parallel)
    if output_type == "latent":
        return latents
    if parallel is None:
        rows = decode_layers(components, request, latents)
    else:  # tiled: the tiles split across ranks; untiled: rank 0 decodes alone
        rows = parallel.decode(lambda x, share: decode_layers(components, request, x, share), latents,
                               _tiling(components, request)[0])
    if rows is None:
        return None
    return rows[0] if len(rows) == 1 else rows
