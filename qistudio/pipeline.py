"""The pipeline: encode -> assemble -> sample -> decode. `QwenImagePipeline` is the seed's front door over it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from . import lora
from .caching import start_cache
from .components import Components, load_components
from .conditioning.control import control_image_and_mask, blurred_mask, control_tokens, inpaint_mask_tensor
from .conditioning.control_residuals import ControlResiduals
from .conditioning.edit import encode_edit_prompts
from .conditioning.edit_inpaint import edit_inpaint_mask, edit_inpaint_start, renoised_blend_step
from .conditioning.eligen import entity_text
from .conditioning.prompt import concat_text_states, encode_prompts
from .conditioning.sequence import DiTSequence, build_sequence
from .imageio import image_to_tensor, tensor_to_images
from .models.instantx_controlnet import QwenImageInstantXControlNet
from .models.text_encoder import TextStates
from .memory.manager import MemoryManager
from .memory.setup import memory_plan_for
from .memory.plan import MemoryPlan
from .ops.packing import patchify, unpatchify
from .ops.rope import ImageGrid
from .request import GenerationRequest, build_request
from .sampling.guidance import guide
from .sampling.sampler import sample_euler
from .sampling.schedule import FlowMatchScheduler, custom_sigmas
from .validation import InputError
from .weights.gguf_text_encoder import missing_vision_message
from .weights.model_config import ModelConfig


def _initial_noise(request: GenerationRequest, dtype, device) -> torch.Tensor:
    if request.noise is not None:
        return request.noise.to(device=device, dtype=dtype)
    # Drawn on rand_device in the compute dtype, as DiffSynth-Studio does: one seed gives one image on any GPU.
    generator = torch.Generator(request.rand_device).manual_seed(request.seed)
    shape = (request.batch_size, 16, *request.latent_size)
    return torch.randn(shape, generator=generator, device=request.rand_device, dtype=dtype).to(device)


def _sigmas(request: GenerationRequest, scheduler: FlowMatchScheduler) -> torch.Tensor:
    if request.sigmas is not None:
        return custom_sigmas(request.sigmas)
    h, w = request.latent_size
    return scheduler.sigmas(
        request.num_inference_steps, (h // 2) * (w // 2), request.denoising_strength, request.exponential_shift_mu
    )


def _repeat_rows(states: TextStates, times: int) -> TextStates:
    if times == 1:
        return states
    return TextStates(states.states.repeat_interleave(times, dim=0), [n for n in states.lengths for _ in range(times)])


def encode_text(components: Components, request: GenerationRequest, device, dtype) -> tuple[TextStates, TextStates | None]:
    """Positive states for every image of the batch, and negative ones when guidance is on.

    With edit images, each prompt is read together with its row's images; the negative prompt too.
    """
    def encode(prompts: list[str]) -> TextStates:
        if request.edit_rows is not None:
            return encode_edit_prompts(components.text_encoder, components.edit_processor(), prompts, request.edit_rows,
                                       request.edit_image_auto_resize, device, dtype)
        return encode_prompts(components.text_encoder, components.prompt_tokenizer(), prompts, device, dtype)

    positive = _repeat_rows(encode(request.prompts), request.num_images)
    negative = None
    if request.use_cfg:
        negative = _repeat_rows(encode([request.negative_prompt] * len(request.prompts)), request.num_images)
    entities = request.entities
    if entities is not None:
        # Each entity prompt encoded on its own (one batch), then packed before each row's global prompt.
        positive = entity_text(encode(entities.prompts), positive)
        if negative is not None and entities.on_negative:
            # The negative prompt stands in for every entity, under the same regions (DiffSynth-Studio's rule).
            negative = entity_text(encode([request.negative_prompt] * len(entities.prompts)), negative)
    return positive, negative


def encode_edit_latents(components: Components, request: GenerationRequest, device, dtype) -> list[list[torch.Tensor]]:
    """Per batch row, the VAE latents (16, h, w) of its edit images; empty lists without edit images."""
    if request.edit_rows is None:
        return [[] for _ in range(request.batch_size)]
    per_prompt = []
    with torch.no_grad():
        for row in request.edit_rows:
            images = row.latent_images(request.edit_image_auto_resize)
            per_prompt.append([
                components.vae.encode(image_to_tensor(im, device, dtype), *_vae_tiling(components, request))[0].to(dtype)
                for im in images
            ])
    return [latents for latents in per_prompt for _ in range(request.num_images)]


def make_velocity_fn(components: Components, request: GenerationRequest, positive, negative, conditions,
                     controls=(), num_steps: int = 1, cache=None, parallel=None):
    """velocity(x, sigma, step) over latents (B, 16, h, w), with guidance folded in and ControlNets injected;
    `cache` (caching.start_cache) may skip DiT work, deciding per guidance branch; `parallel` (a
    parallel.runtime.ParallelRuntime) splits each DiT call across ranks."""
    dit = components.dit
    model = dit if parallel is None else parallel.dit(dit)
    h, w = request.latent_size
    target = ImageGrid(0, h // 2, w // 2)
    zero_cond_t = dit.config.zero_cond_t if request.zero_cond_t is None else request.zero_cond_t
    masks = None if request.entities is None else request.entities.token_masks
    residuals = ControlResiduals(list(controls), components.controlnets, target, positive, num_steps,
                                 dit.config.num_layers, masks)

    def sequence(text: TextStates, rows: list[list[torch.Tensor]]) -> DiTSequence:
        return build_sequence(target, rows, text, dit.config.axes_dim, request.edit_rope_interpolation, zero_cond_t,
                              masks)

    batched = negative is not None and request.cfg_batch
    if batched:
        both = sequence(concat_text_states([positive, negative]), conditions + conditions)
    else:
        cond_seq = sequence(positive, conditions)
        uncond_seq = None if negative is None else sequence(negative, conditions)

    def run(seq: DiTSequence, tokens: torch.Tensor, timestep: torch.Tensor, hook, gate=None) -> torch.Tensor:
        if seq.condition_tokens is not None:
            tokens = torch.cat([tokens, seq.condition_tokens.to(tokens.dtype)], dim=1)
        return model(tokens, seq.text.states, timestep, seq.rotary, seq.text_lengths,
                   num_target_tokens=seq.num_target_tokens, condition_token_mask=seq.condition_token_mask,
                   attention_mask=seq.attention_mask, block_hook=hook, block_gate=gate)

    def cached_run(step: int, branches: tuple[str, ...], seq, tokens, timestep, hook) -> torch.Tensor:
        if cache is None:
            return run(seq, tokens, timestep, hook)
        return cache.forward(step, branches, lambda gate: run(seq, tokens, timestep, hook, gate))

    def velocity(x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        tokens = patchify(x)  # (B, N, 64)
        timestep = torch.full((tokens.shape[0],), sigma, device=x.device, dtype=torch.float32)
        with torch.no_grad():
            hook = residuals.hook(step, tokens, timestep)  # InstantX ControlNets run here, once per step
            if batched:
                cond, uncond = cached_run(step, ("cond", "uncond"), both, torch.cat([tokens, tokens]),
                                          timestep.repeat(2), hook).chunk(2)
            else:
                cond = cached_run(step, ("cond",), cond_seq, tokens, timestep, hook)
                uncond = None if uncond_seq is None else cached_run(step, ("uncond",), uncond_seq, tokens, timestep,
                                                                    hook)
        if uncond is not None:
            cond = guide(cond, uncond, request.cfg_scale, request.cfg_norm_rescale)
        return unpatchify(cond, h // 2, w // 2)

    return velocity


def loaded_controlnets(components: Components) -> str:
    """'3 Blockwise ControlNet(s) are', '2 ControlNet(s) (1 Blockwise, 1 InstantX) are', ...: for messages."""
    nets = components.controlnets
    instantx = sum(isinstance(net, QwenImageInstantXControlNet) for net in nets)
    if not nets or instantx in (0, len(nets)):
        family = "" if not nets else "InstantX " if instantx else "Blockwise "
        return f"{len(nets)} {family}ControlNet(s) are"
    return f"{len(nets)} ControlNet(s) ({len(nets) - instantx} Blockwise, {instantx} InstantX) are"


def require_components(components: Components, request: GenerationRequest) -> None:
    """Fail before any model runs when the request needs a model that was not loaded."""
    needed = ["dit", "text_encoder"]
    images = (request.input_image, request.edit_rows, request.context_image, request.controlnet_inputs or None)
    if any(i is not None for i in images):
        needed.append("vae")
    for control in request.controlnet_inputs:
        if not 0 <= control.controlnet_id < len(components.controlnets):
            raise InputError(
                f"ControlNetInput(controlnet_id={control.controlnet_id}) but {loaded_controlnets(components)} "
                "loaded (ids follow the order of their ModelConfigs); load one with "
                "ModelConfig(model_id='DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Canny', "
                "origin_file_pattern='model.safetensors') or ModelConfig(model_id='InstantX/Qwen-Image-ControlNet-"
                "Union', origin_file_pattern='diffusion_pytorch_model.safetensors')"
            )
        if components.controlnets[control.controlnet_id].config.additional_in_channels and control.inpaint_mask is None:
            raise InputError(f"ControlNet {control.controlnet_id} is an Inpaint ControlNet: give its ControlNetInput "
                             "an inpaint_mask (white = repaint)")
    if components.processor is None:
        needed.append("tokenizer")  # text prompts, and the processor built for edit images, need it
    components.require(*needed)
    if request.edit_rows is not None and not getattr(components.text_encoder, "has_vision", True):  # GGUF, no mmproj
        raise InputError(missing_vision_message(components.files.get("text_encoder", ["the text encoder"])))


@dataclass
class ImageInputs:
    """What the VAE phase makes of a request's images."""

    conditions: list[list[torch.Tensor]]  # per row, latents (16, h, w) appended after the target (context, edits)
    start: torch.Tensor  # the latents sampling starts from (noise, or the noised input image)
    input_latents: torch.Tensor | None = None  # (1, 16, h, w) of input_image, for inpainting
    inpaint_mask: torch.Tensor | None = None  # (1, 1, h, w) in [0, 1], 1 = repaint
    controls: list = field(default_factory=list)  # (ControlNetInput, patchified control features (1, N, 64|68))


def _encode(components: Components, request: GenerationRequest, image, device, dtype) -> torch.Tensor:
    with torch.no_grad():
        return components.vae.encode(image_to_tensor(image, device, dtype), *_vae_tiling(components, request)).to(dtype)


def encode_images(components: Components, request: GenerationRequest, noise, sigma0: float, device, dtype):
    """The VAE phase: edit and context latents, the image-to-image start, inpainting and control inputs."""
    inputs = ImageInputs(encode_edit_latents(components, request, device, dtype), noise)
    h, w = request.latent_size
    if request.context_image is not None:
        context = _encode(components, request, request.context_image, device, dtype)[0]
        inputs.conditions = [[context, *row] for row in inputs.conditions]  # frame 1, before any edit image
    if request.input_image is not None:
        inputs.input_latents = _encode(components, request, request.input_image.resize((request.width, request.height)),
                                       device, dtype)
        inputs.start = (1 - sigma0) * inputs.input_latents + sigma0 * noise
    if request.edit_inpainting:
        inputs.input_latents, inputs.start = edit_inpaint_start(inputs.conditions, noise, sigma0)
        mask = edit_inpaint_mask(request.inpaint_mask, request.height, request.width, device)
        inputs.inpaint_mask = blurred_mask(mask, request.inpaint_blur_size, request.inpaint_blur_sigma).to(dtype)
    elif request.inpaint_mask is not None:
        mask = inpaint_mask_tensor(request.inpaint_mask, h, w, device)
        inputs.inpaint_mask = blurred_mask(mask, request.inpaint_blur_size, request.inpaint_blur_sigma).to(dtype)
    for control in request.controlnet_inputs:
        image, mask = control_image_and_mask(components.controlnets[control.controlnet_id], control, request.width,
                                             request.height, device)
        inputs.controls.append((control, control_tokens(_encode(components, request, image, device, dtype), mask)))
    return inputs


def generate_latents(
    components: Components, request: GenerationRequest, device, dtype, scheduler: FlowMatchScheduler | None = None,
    parallel=None,
) -> torch.Tensor:
    """The denoised latents (B, 16, h, w) of a request; with `parallel`, this rank's part of a parallel run."""
    require_components(components, request)
    if parallel is not None:
        parallel.prepare(request)
    cache = start_cache(request.cache, components.dit.config.num_layers)
    request.extras["step_cache"] = None if cache is None else cache.log  # for last_cache_report: no tensors kept
    sigmas = _sigmas(request, scheduler or FlowMatchScheduler())
    noise = _initial_noise(request, dtype, device)
    with components.phase("text encoding", "text_encoder"):
        if parallel is None:
            positive, negative = encode_text(components, request, device, dtype)
        else:  # once, on rank 0, and broadcast
            positive, negative = parallel.encode_once(lambda: encode_text(components, request, device, dtype))
    with components.phase("image encoding", "vae"):
        images = encode_images(components, request, noise, float(sigmas[0]), device, dtype)
    with components.phase("denoising", "dit"):
        velocity = make_velocity_fn(components, request, positive, negative, images.conditions, images.controls,
                                    len(sigmas) - 1, cache, parallel)
        step_fn = None
        if request.edit_inpainting:
            step_fn = renoised_blend_step(images.input_latents, noise, images.inpaint_mask, sigmas)
        elif images.inpaint_mask is not None:
            step_fn = _inpaint_step(images.input_latents, images.inpaint_mask, sigmas)
        return sample_euler(velocity, images.start, sigmas, callback=request.callback,
                            progress=request.progress_bar_cmd, step_fn=step_fn)


def _inpaint_step(input_latents: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor):
    """Keep the unmasked region on the straight path back to the input: v = v_to_input (1 - m) + v_model m."""

    def step(x: torch.Tensor, velocity: torch.Tensor, i: int) -> torch.Tensor:
        expected = (x.float() - input_latents.float()) / float(sigmas[i])
        return (expected * (1 - mask.float()) + velocity.float() * mask.float()).to(velocity.dtype)

    return step


def _vae_tiling(components: Components, request: GenerationRequest) -> tuple:
    tiled = request.tiled or (components.memory is not None and components.memory.tiled_vae)
    return tiled, request.tile_size, request.tile_stride


def decode(components: Components, request: GenerationRequest, latents: torch.Tensor, share=None):
    """The images of `latents`; `share` splits the VAE's tiles across ranks (None where a rank keeps nothing)."""
    components.require("vae")
    with components.phase("decoding", "vae"), torch.no_grad():
        images = components.vae.decode(latents, *_vae_tiling(components, request), share=share)
    return None if images is None else tensor_to_images(images)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# The seed's default. None loads no tokenizer: the processor's (Edit models) then serves text prompts too.
DEFAULT_TOKENIZER_CONFIG = ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="tokenizer/")


class QwenImagePipeline:
    """Seed-compatible front door: `from_pretrained(...)` loads, `pipe(prompt, ...)` generates. No logic of its own."""

    def __init__(self, components: Components, device, torch_dtype: torch.dtype):
        self.components = components
        self.device = torch.device(device)
        self.torch_dtype = torch_dtype
        self.last_request: GenerationRequest | None = None
        self.scheduler = FlowMatchScheduler("Qwen-Image")  # replaceable, as in the seed: FlowMatchScheduler(...)
        self._plan_on_first_call = False
        self.parallel = None  # a parallel.runtime.ParallelRuntime after enable_parallelism

    @classmethod
    def from_pretrained(
        cls,
        torch_dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
        model_configs: list[ModelConfig] = (),
        tokenizer_config: ModelConfig | None = DEFAULT_TOKENIZER_CONFIG,
        processor_config: ModelConfig | None = None,
        vram_limit: float | None = None,
    ) -> "QwenImagePipeline":
        """Load the models. With `vram_limit` (GiB) or any ModelConfig's `offload_device`, VRAM management is on."""
        device = device or default_device()
        components = load_components(list(model_configs), tokenizer_config, processor_config, torch_dtype, device)
        from .pipeline21 import pipeline_class  # a Qwen-Image 2.1 DiT gets 2.1's call (pipeline21.py)

        pipe = pipeline_class(cls, components)(components, device, torch_dtype)
        if vram_limit is not None:
            pipe.enable_vram_management(vram_limit=vram_limit)
        # Models given an offload_device were loaded into host memory; unless the caller plans memory first
        # (the seed's `pipe.enable_vram_management(...)`), the first call does it with the defaults.
        pipe._plan_on_first_call = any(c.offload_device for c in model_configs) and vram_limit is None
        return pipe

    def enable_vram_management(self, vram_limit: float | None = None, vram_buffer: float = 0.5,
                               num_persistent_param_in_dit: int | None = None,
                               enable_dit_fp8_computation: bool = False) -> MemoryPlan:
        """Fit the pipeline into `vram_limit` GiB of device memory (None: the free memory less `vram_buffer`;
        0: the smallest footprint). Returns the plan; `pipe.memory_report` gives each phase's peak after a call.

        Models whose ModelConfig had `offload_dtype=torch.float8_e4m3fn` are stored in FP8 (per-channel scales).
        `num_persistent_param_in_dit` (the seed's knob) caps how many DiT parameters stay on the device.
        """
        plan = memory_plan_for(self.components, self.device, vram_limit, vram_buffer, num_persistent_param_in_dit,
                               enable_dit_fp8_computation)
        if self.components.memory is not None:
            self.components.memory.teardown()  # weights back to host memory, then re-planned from there
        self.components.memory = MemoryManager(self.components.models, self.device, plan,
                                               self.components.disk_sources)
        self._plan_on_first_call = False
        return plan

    def compile(self, mode: str | None = None, dynamic: bool | None = None) -> "QwenImagePipeline":
        """Regional torch.compile of the DiT's blocks (and of loaded ControlNets' blocks): the first call at a new
        size compiles (about a minute on an H100; cached on disk for later processes), later calls run fused.
        `mode="max-autotune-no-cudagraphs"` also tunes the GEMMs (longer warm-up). Works with LoRAs, FP8 and
        VRAM management; returns the pipeline."""
        from .compile import compile_repeated_blocks

        compile_repeated_blocks(self.components.dit, mode, dynamic)
        for controlnet in self.components.controlnets:
            if hasattr(controlnet, "transformer_blocks") or hasattr(controlnet, "controlnet_blocks"):
                compile_repeated_blocks(controlnet, mode, dynamic)
        return self

    def enable_fp8_computation(self, attention: bool = True, fast_accumulation: bool = True) -> None:
        """W8A8 FP8 matmuls for the DiT's block linears (weights quantised to FP8 with per-channel scales if they
        are not yet, activations per token), and FP8 attention where cuDNN's FP8 kernel runs (Hopper or newer
        with nvidia-cudnn-frontend; `attention=False` keeps bf16 attention): the seed's
        `enable_dit_fp8_computation` without a VRAM budget. `fast_accumulation=False` promotes the FP8 GEMMs'
        partial sums to float32 (cuBLAS's exact mode: about 10% slower, no measurable accuracy gain). About 1.3%
        relative error of the DiT output against bf16 either way (bench/RESULTS.md)."""
        from .memory.setup import enable_fp8_compute

        enable_fp8_compute(self.components, attention, fast_accumulation)

    def enable_parallelism(self, degrees: str | dict | None = "auto", *, data: int | None = None,
                           cfg: int | None = None, ulysses: int | None = None, ring: int | None = None,
                           timeout: float = 300.0):
        """Split every later call across the ranks of a `torchrun --nproc_per_node N` run (one GPU per rank; load
        with `device=qistudio.parallel.local_device()`). Every rank makes the same calls, with the same arguments.

        Degrees, whose product is the number of ranks (missing ones are 1; "auto": cfg=2 on an even count, then
        Ulysses as far as it divides the heads, ring for the rest, and for calls without guidance Ulysses and ring
        over every rank): `cfg` 2 runs the positive and the negative
        guidance branch on different ranks; `ulysses` splits the attention heads (it must divide the model's 24);
        `ring` passes keys and values around a ring (any count); `data` splits the batch's images (prompts x
        num_images). Image tokens are sharded across the ulysses x ring ranks, the text replicated; the text
        encoder runs once, on rank 0, and its states are broadcast; a tiled VAE decode (tiled=True) splits its tiles
        across the ranks, an untiled one runs on rank 0. A collective that gets no answer within `timeout` seconds
        (when this call starts the process group) or loses a rank ends every rank with
        qistudio.parallel.ParallelError. Returns the Degrees used (for calls with guidance).

        Afterwards `pipe(...)` returns the images on rank 0 and None on every other rank (with
        output_type="latent", every rank returns the same latents). Step caching (cache=) skips the same steps as
        in one process, on every rank. Qwen-Image-Layered calls split alike (rank 0 returns the layers).
        """
        from .parallel.runtime import enable_parallelism

        self.components.require("dit")
        given = {name: value for name, value in dict(data=data, cfg=cfg, ulysses=ulysses, ring=ring).items()
                 if value is not None}
        self.parallel = enable_parallelism(self.device, self.components.dit.config.num_heads, given or degrees,
                                           timeout)
        return self.parallel.degrees

    def disable_vram_management(self) -> None:
        """Every model back on the device (when it fits), hooks removed."""
        memory = self.components.memory
        if memory is None:
            return
        memory.teardown()
        self.components.memory = None
        for model in self.components.models.values():
            model.to(self.device)

    @property
    def memory_report(self) -> dict[str, int]:
        """Peak device memory (bytes) per phase of the calls so far, with VRAM management on a GPU."""
        return {} if self.components.memory is None else dict(self.components.memory.report)

    @property
    def dit(self):
        return self.components.dit

    @property
    def vae(self):
        return self.components.vae

    @property
    def text_encoder(self):
        return self.components.text_encoder

    @property
    def tokenizer(self):
        return self.components.tokenizer

    @property
    def controlnets(self):
        return self.components.controlnets

    @property
    def processor(self):
        return self.components.processor

    @property
    def last_seed(self) -> int | None:
        return None if self.last_request is None else self.last_request.seed

    @property
    def last_cache_report(self) -> dict | None:
        """The last call's step cache: its settings and, per guidance branch, the steps that ran the DiT in full."""
        log = None if self.last_request is None else self.last_request.extras.get("step_cache")
        return None if log is None else log.report()

    # LoRA: thin wrappers over qistudio.lora, with the seed's names. A LoRA's registry lives on the module it
    # was loaded into (normally the DiT); text-encoder layers in the same file follow it.
    def load_lora(self, module, lora_config=None, alpha: float = 1.0, hotload: bool | None = None,
                  state_dict=None, name: str | None = None, fuse: bool = False) -> str:
        """Attach a LoRA (path, ModelConfig or state dict) to `module`, usually `pipe.dit`; returns its name.

        Unfused by default: switching scales or unloading never touches the base weights. `fuse=True` (or the
        seed's `hotload=False`) bakes it in for speed; `pipe.unload_lora` restores the weights exactly.
        """
        if (lora_config is None) == (state_dict is None):
            raise ValueError("give a LoRA as lora_config (a path or ModelConfig) or as state_dict, not both or neither")
        fuse = fuse or hotload is False
        text_encoder = self.text_encoder if module is self.dit else None
        return lora.load_lora(module, lora_config if state_dict is None else state_dict, alpha, name, fuse,
                              text_encoder=text_encoder, device=self.device)

    def set_lora_scale(self, name: str, scale: float, module=None) -> None:
        lora.set_lora_scale(module if module is not None else self.dit, name, scale)

    def unload_lora(self, name: str | None = None, module=None) -> None:
        """Remove one LoRA (or all) and restore the exact base weights; the base model is never reloaded."""
        lora.unload_lora(module if module is not None else self.dit, name)

    def clear_lora(self) -> None:
        """The seed's name for removing every LoRA."""
        self.unload_lora()

    def list_loras(self, module=None):
        return lora.list_loras(module if module is not None else self.dit)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | None = "",
        cfg_scale: float = 4.0,
        input_image=None,
        denoising_strength: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int = 30,
        exponential_shift_mu: float | None = None,
        edit_image=None,
        edit_image_auto_resize: bool = True,
        edit_rope_interpolation: bool = False,
        zero_cond_t: bool | None = None,
        eligen_entity_prompts: list[str] | None = None,
        eligen_entity_masks: list | None = None,
        eligen_enable_on_negative: bool = False,
        blockwise_controlnet_inputs: list | None = None,
        inpaint_mask=None,
        inpaint_blur_size: int | None = None,
        inpaint_blur_sigma: float | None = None,
        context_image=None,
        image=None,
        layers: int | None = None,
        resolution: int = 640,
        use_en_prompt: bool = False,
        tiled: bool = False,
        tile_size: int | tuple = 128,
        tile_stride: int | tuple = 64,
        progress_bar_cmd=tqdm,
        noise: torch.Tensor | None = None,
        num_images: int = 1,
        cfg_norm_rescale: bool | None = None,
        sigmas: list[float] | None = None,
        callback=None,
        cfg_batch: bool = True,
        output_type: str = "pil",
        cache=None,
    ):
        """Generate; returns a PIL image (a list when several images are made; latents with output_type="latent").

        With `image=` and `layers=N` (Qwen-Image-Layered's DiT and VAE loaded) it splits the image into N RGBA
        layers instead, at `resolution` (640 or 1024) squared pixels: a list of layers, bottom first (a list of such
        lists for several prompts or num_images); an empty prompt becomes a caption the text encoder writes of the
        image, in English with `use_en_prompt=True`, else in Chinese (conditioning/caption.py).

        Every argument is checked before any model runs; a wrong type, a NaN or infinity, or an out-of-range value
        is one `qistudio.validation.InputError` (a ValueError) naming the argument. `negative_prompt=None` means
        no negative prompt, so no guidance (diffusers' rule: a warning if cfg_scale is not 1); the default ""
        guides against the empty prompt (the seed's). Images (PIL or paths) are read upright (EXIF), 16-bit and float
        images scaled to 8 bits (qistudio.imageio.read_image). `cache` skips DiT work on steps that change little
        (qistudio.caching: a preset such as "compute-every-2", or FirstBlockCache, DBCache, TaylorSeer, FixedSchedule);
        `pipe.last_cache_report` then says which steps ran the DiT in full.
        """
        if output_type not in ("pil", "latent"):
            raise InputError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        request = build_request(
            prompt, negative_prompt=negative_prompt, cfg_scale=cfg_scale, cfg_norm_rescale=cfg_norm_rescale,
            num_inference_steps=num_inference_steps, height=height, width=width, num_images=num_images, seed=seed,
            rand_device=rand_device, noise=noise, input_image=input_image, denoising_strength=denoising_strength,
            sigmas=sigmas, exponential_shift_mu=exponential_shift_mu, edit_image=edit_image,
            edit_image_auto_resize=edit_image_auto_resize, edit_rope_interpolation=edit_rope_interpolation,
            zero_cond_t=zero_cond_t, eligen_entity_prompts=eligen_entity_prompts,
            eligen_entity_masks=eligen_entity_masks, eligen_enable_on_negative=eligen_enable_on_negative,
            blockwise_controlnet_inputs=blockwise_controlnet_inputs, inpaint_mask=inpaint_mask,
            inpaint_blur_size=inpaint_blur_size, inpaint_blur_sigma=inpaint_blur_sigma, context_image=context_image,
            image=image, layers=layers, resolution=resolution, use_en_prompt=use_en_prompt,
            tiled=tiled, tile_size=tile_size,
            tile_stride=tile_stride, cfg_batch=cfg_batch, callback=callback, progress_bar_cmd=progress_bar_cmd,
            cache=cache,
        )
        self.last_request = request
        if self._plan_on_first_call:
            self.enable_vram_management()
        try:
            if request.layered is not None:  # Qwen-Image-Layered: RGBA layers of the image (qistudio/layered.py)
                from .layered import generate_layers

                return generate_layers(self.components, request, self.device, self.torch_dtype, output_type,
                                       self.parallel)
            latents = generate_latents(self.components, request, self.device, self.torch_dtype, self.scheduler,
                                       self.parallel)
            if output_type == "latent":
                return latents
            if self.parallel is None:
                images = decode(self.components, request, latents)
            else:  # tiled: the tiles split across ranks; rank 0 keeps the images, the other ranks get None
                images = self.parallel.decode(lambda x, share: decode(self.components, request, x, share), latents,
                                              _vae_tiling(self.components, request)[0])
        finally:
            if self.components.memory is not None:
                self.components.memory.release()
        if images is None:
            return None
        return images[0] if len(images) == 1 else images
