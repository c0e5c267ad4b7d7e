"""The calls tests/test_parallel.py makes split across ranks and in one process, and the rank side of it.

Imported by the test process and by the spawned ranks (qistudio.parallel.launch), so every case is built the same
way on both sides: same pipeline files, same arguments, same seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qistudio.caching import DBCache, FirstBlockCache, TaylorSeer

STEPS = 3
# Both guidance branches on, with a negative prompt whose length differs from the prompt's: batched CFG's text
# padding (key lengths) meets every layout.
BASE = dict(prompt="a red fox in the snow", negative_prompt="blurry", cfg_scale=4.0, height=64, width=64,
            num_inference_steps=STEPS, seed=3)
UNEVEN = dict(height=48, width=80)  # 6 x 10 latents: 15 image tokens, which no rank count here divides


def _edit_image() -> Image.Image:
    """A 64 x 48 RGB gradient: another size than the output, so the edit tokens have a grid of their own."""
    ramp = (np.add.outer(np.arange(48), np.arange(64)) * 2 % 256).astype(np.uint8)
    return Image.fromarray(np.stack([ramp, ramp[::-1], 255 - ramp], -1))


def _entity_masks() -> list[Image.Image]:
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 255
    top = np.zeros((64, 64), np.uint8)
    top[:24] = 255
    return [Image.fromarray(left), Image.fromarray(top)]


def _inpaint_mask() -> Image.Image:
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    return Image.fromarray(mask)


def _rgba_image() -> Image.Image:
    """A 64 x 32 RGBA image, partly transparent: Layered's working size at the shrunk area (LAYERED_AREA) as it is."""
    return Image.fromarray(np.random.default_rng(7).integers(0, 256, (32, 64, 4), dtype=np.uint8), "RGBA")


def _product(degrees: dict | str) -> int:
    return 2 if degrees == "auto" else int(np.prod(list(degrees.values())))


ENTITIES = dict(eligen_entity_prompts=["a fox", "a moon"], eligen_entity_masks="masks")
EDIT = dict(edit_image="edit", edit_image_auto_resize=False)  # the small image as it is: fast on the CPU
CONTROL = dict(blockwise_controlnet_inputs="control")  # the Blockwise ControlNet (controlnet_id 0)
INSTANTX = dict(blockwise_controlnet_inputs="instantx")  # the InstantX Union ControlNet (controlnet_id 1)
TWO_PROMPTS = ["a red fox in the snow", "two birds"]
# Eight steps, so that steps are skipped; thresholds where the tiny model's changes (0.45-0.97) fall on both sides
# of them, the two guidance branches deciding differently on some steps.
CACHED = dict(num_inference_steps=8)
CACHES = dict(first_block=FirstBlockCache(0.56),
              dbcache=DBCache(front_blocks=1, warmup_steps=2, residual_diff_threshold=0.56, taylorseer_order=1),
              # float32 factors: bfloat16 ones round the ranks' last-bit differences (ring's merge order) to 1e-4
              taylorseer=TaylorSeer(warmup_steps=2, cache_interval=2, factors_dtype="float32"))
INPAINT = dict(input_image="edit", inpaint_mask="inpaint", denoising_strength=0.8)
# Qwen-Image-Layered (tests/tiny_layered.py's model): its working area shrunk from 640^2 to 40^2 pixels (as
# tests/test_layered_*.py shrink it, no code path changed), so the 64 x 32 image gives 4 x 2 patches per frame:
# (layers + 1 frames + the input image) x 8 image tokens. Layered's sides are multiples of 32, so every frame
# has a multiple of 4 tokens and 2 or 4 ranks always divide the count; three layers (40 tokens) put the
# sequence ranks' boundary inside a frame instead. Two steps; the caption (an empty prompt) 4 tokens long.
LAYERED_AREA = 640 * 640 // 256
LAYERED_CAPTION_TOKENS = 4
LAYERED = dict(layered=True, image="rgba", layers=2, resolution=640, num_inference_steps=2)
# Qwen-Image 2.1 floors sizes to multiples of 32 (2 x 2 latent tokens), so 2 or 4 ranks always divide its target's
# token count (8 ranks do not at 32 x 96: 12 tokens). `exact_size` lifts the floor for the call, on the ranks and in
# one process alike (no code path changed): 48 x 80 is 3 x 5 = 15 target tokens, the last ring chunk padded.
Q21_UNEVEN = dict(height=48, width=80, exact_size=True)

# name -> (degrees or "auto", the call's arguments beyond BASE); "lora" loads a LoRA on the DiT for the call
# ("hooks" or "fused"); "vram" turns VRAM management on for the call (its arguments); "compile" compiles the ranks'
# DiT blocks first (torch.compile with the aot_eager backend:
# traced whole, fullgraph, collectives included, without code generation), for this and every later case, while
# the one-process reference stays eager: cases after the first compiled one pay for recompiles, so few come after.
CASES = {
    "cfg2": (dict(cfg=2), {}),
    "cfg2_uneven": (dict(cfg=2), UNEVEN),
    "ulysses2": (dict(ulysses=2), {}),
    "ulysses2_uneven": (dict(ulysses=2), UNEVEN),
    "ring2": (dict(ring=2), {}),
    "ring2_uneven": (dict(ring=2), UNEVEN),
    "data2": (dict(data=2), dict(prompt=TWO_PROMPTS)),
    # no seed given: each process would draw its own; rank 0's is used by all (the test remakes it from rank 0's)
    "random_seed_ulysses2": (dict(ulysses=2), dict(seed=None)),
    "data2_three_images": (dict(data=2), dict(num_images=3, cfg_scale=1.0)),
    "edit_ulysses2": (dict(ulysses=2), EDIT),
    "edit_ring2_uneven": (dict(ring=2), {**EDIT, **UNEVEN}),
    "eligen_ulysses2": (dict(ulysses=2), {**ENTITIES, "eligen_enable_on_negative": True}),
    "eligen_ring2": (dict(ring=2), {**ENTITIES, "eligen_enable_on_negative": True}),
    "controlnet_ulysses2_uneven": (dict(ulysses=2), {**CONTROL, **UNEVEN}),
    "controlnet_ring2": (dict(ring=2), CONTROL),
    # one row per rank, a prompt's sample per row: the ControlNet's hook sees every row
    "instantx_data2_no_guidance": (dict(data=2), dict(prompt=TWO_PROMPTS, cfg_scale=1.0, **INSTANTX)),
    "inpaint_cfg2": (dict(cfg=2), INPAINT),
    "lora_hooks_ulysses2": (dict(ulysses=2), dict(lora="hooks")),
    "lora_fused_ring2": (dict(ring=2), dict(lora="fused")),
    "vram_streaming_ulysses2": (dict(ulysses=2), dict(vram=dict(vram_limit=0))),  # every block streamed, per rank
    # step caches: every rank makes the one-process decisions (the same steps skipped, per guidance branch)
    "first_block_ulysses2_uneven": (dict(ulysses=2), dict(cache=CACHES["first_block"], **CACHED, **UNEVEN)),
    "dbcache_taylor_cfg2": (dict(cfg=2), dict(cache=CACHES["dbcache"], **CACHED)),
    "first_block_data2_three_images": (dict(data=2), dict(num_images=3, cfg_scale=1.0, cache=CACHES["first_block"],
                                                          **CACHED)),
    "taylorseer_ring2": (dict(ring=2), dict(cache=CACHES["taylorseer"], **CACHED)),
    # "auto": cfg=2 for calls with guidance, every rank on the tokens (ulysses=2 here) for calls without
    "auto_guidance": ("auto", {}),
    "auto_no_guidance": ("auto", dict(cfg_scale=1.0)),
    # FP8 compute (W8A8 linears, FP8 attention in its CPU reference form): Ulysses' all-to-alls in float8, v's
    # scale agreed by every rank (another pipeline, FP8 for good, loaded for these cases)
    "fp8_ulysses2_uneven": (dict(ulysses=2), dict(fp8=True, **UNEVEN)),
    # Qwen-Image 2.1 (the tiny 2.1 model, pipeline21.py): guidance branches over cfg, images over data, the target
    # tokens over Ulysses with each rank's heads of the prefix K/V cache; edit images in the prefix
    "q21_cfg2_edit": (dict(cfg=2), dict(qwen21=True, edit_image=["edit"], output_resolution=64)),
    "q21_data2": (dict(data=2), dict(qwen21=True, prompt=TWO_PROMPTS, cfg_scale=1.0)),
    "q21_ulysses2_edit": (dict(ulysses=2), dict(qwen21=True, edit_image=["edit", "edit"], output_resolution=64,
                                                  cfg_scale=1.0)),
    "q21_ulysses2_no_kv_cache": (dict(ulysses=2), dict(qwen21=True, use_kv_cache=False)),
    # ring: the target's K/V around the ring, the cached prefix one more partial of the merged softmax
    "q21_ring2_uneven": (dict(ring=2), dict(qwen21=True, **Q21_UNEVEN)),
    # (two images of one prompt: two rows over the prefix cache's one)
    "q21_ring2_edit_two_images": (dict(ring=2), dict(qwen21=True, edit_image=["edit"], output_resolution=64,
                                                     num_images=2, cfg_scale=1.0)),
    "compiled_ulysses2": (dict(ulysses=2), dict(compile=True)),
    "compiled_ring2_uneven": (dict(ring=2), dict(compile=True, **UNEVEN)),
    # refused with one error on every rank ("expect": its type), before the DiT runs
    "compiled_eligen_ulysses2": (dict(ulysses=2), dict(compile=True, expect="ParallelConfigError", **ENTITIES)),
    # the images: rank 0's, the VAE's 9 tiles split across the ranks; None on rank 1
    "tiled_decode_ulysses2": (dict(ulysses=2), dict(output_type="pil", tiled=True, tile_size=4, tile_stride=2)),
    # Qwen-Image-Layered: the frames and the input image's tokens sharded with their layer-3D RoPE rows, the
    # extra timestep condition per row; an empty prompt captioned on rank 0 and broadcast
    "layered_caption_cfg2": (dict(cfg=2), dict(LAYERED, prompt="")),
    "layered_ulysses2_three_layers": (dict(ulysses=2), dict(LAYERED, layers=3)),
    "layered_ring2": (dict(ring=2), LAYERED),
    "layered_data2": (dict(data=2), dict(LAYERED, prompt=TWO_PROMPTS)),
    # the layers as RGBA images: rank 0's, the VAE's 3 tiles per layer split across the ranks; None on rank 1 (the
    # untiled decode, rank 0 alone, is the CLI test's)
    "layered_tiled_images_ulysses2": (dict(ulysses=2), dict(LAYERED, output_type="pil", tiled=True, tile_size=4,
                                                            tile_stride=2)),
    # four ranks
    "cfg2_ulysses2": (dict(cfg=2, ulysses=2), {}),
    "layered_cfg2_ulysses2": (dict(cfg=2, ulysses=2), LAYERED),
    "fp8_cfg2_ulysses2": (dict(cfg=2, ulysses=2), dict(fp8=True)),
    "q21_cfg2_ulysses2_edit": (dict(cfg=2, ulysses=2), dict(qwen21=True, edit_image=["edit"], output_resolution=64)),
    "q21_data2_ulysses2_three_images": (dict(data=2, ulysses=2), dict(qwen21=True, num_images=3, cfg_scale=1.0,
                                                                      height=96)),
    "ulysses2_ring2_uneven": (dict(ulysses=2, ring=2), UNEVEN),
    "q21_ulysses2_ring2_edit_uneven": (dict(ulysses=2, ring=2), dict(qwen21=True, edit_image=["edit"],
                                                                     output_resolution=64, **Q21_UNEVEN)),
    "ring4_eligen": (dict(ring=4), ENTITIES),
    "cfg2_ring2_edit": (dict(cfg=2, ring=2), EDIT),
    "data2_cfg2": (dict(data=2, cfg=2), dict(prompt=TWO_PROMPTS)),
    "instantx_cfg2_ulysses2_uneven": (dict(cfg=2, ulysses=2), {**INSTANTX, **UNEVEN}),
    "first_block_cfg2_ulysses2_uneven": (dict(cfg=2, ulysses=2),
                                         dict(cache=CACHES["first_block"], **CACHED, **UNEVEN)),
}
TWO_RANKS = [name for name, (degrees, _) in CASES.items() if _product(degrees) == 2]
FOUR_RANKS = [name for name, (degrees, _) in CASES.items() if _product(degrees) == 4]
REFUSED = [name for name, (_, extra) in CASES.items() if "expect" in extra]


def call_arguments(name: str) -> dict:
    """The pipeline call of case `name` (output_type="latent"), without its "lora" entry."""
    from qistudio import ControlNetInput

    extra = {key: value for key, value in CASES[name][1].items()
             if key not in ("lora", "compile", "expect", "vram", "fp8", "qwen21", "layered", "exact_size")}
    base = BASE
    if CASES[name][1].get("layered"):  # the size follows the image (resolution=)
        base = {key: value for key, value in BASE.items() if key not in ("height", "width")}
    size = (extra.get("width", BASE["width"]), extra.get("height", BASE["height"]))
    if "edit_image" in extra and isinstance(extra["edit_image"], list):  # 2.1's list of edit images
        extra["edit_image"] = [_edit_image() for _ in extra["edit_image"]]
    images = dict(edit=_edit_image, masks=_entity_masks, inpaint=_inpaint_mask, rgba=_rgba_image,
                  control=lambda: [ControlNetInput(image=_edit_image().resize(size), scale=0.7)],
                  instantx=lambda: [ControlNetInput(image=_edit_image().resize(size), scale=0.8, controlnet_id=1)])
    for key, value in extra.items():
        if isinstance(value, str) and value in images and key != "prompt":
            extra[key] = images[value]()
    return {**base, "output_type": "latent", **extra, "progress_bar_cmd": lambda steps: steps}


def load_pipeline(repo: str, controlnets: list[str]):
    """The demo pipeline with its ControlNets (a Blockwise one, then an InstantX Union one)."""
    from qistudio import ModelConfig, QwenImagePipeline

    folder = Path(repo)
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[*(ModelConfig(path=str(folder / name)) for name in ("transformer", "text_encoder", "vae")),
                       *(ModelConfig(path=path) for path in controlnets)],
        tokenizer_config=ModelConfig(path=str(folder / "tokenizer")),
        processor_config=ModelConfig(path=str(folder / "processor")),
    )


def load_pipeline21(repo21: str):
    """The tiny Qwen-Image 2.1 pipeline (tests/tiny_qwen21.py's repository)."""
    from qistudio import ModelConfig, QwenImagePipeline
    from tiny_qwen21 import model_configs21

    return QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=model_configs21(Path(repo21)), tokenizer_config=None,
                                             processor_config=ModelConfig(path=str(Path(repo21) / "processor")))


def load_layered(repo_layered: str):
    """The tiny Qwen-Image-Layered pipeline (tests/tiny_layered.py's repository)."""
    from tiny_layered import load_layered_pipe

    return load_layered_pipe(Path(repo_layered))


def _layered_scale():
    """Layered's working area and caption length shrunk for the call (the same on every rank and in one process)."""
    from contextlib import ExitStack
    from unittest import mock

    import qistudio.conditioning.caption as caption
    import qistudio.conditioning.layered as layered

    stack = ExitStack()
    stack.enter_context(mock.patch.dict(layered.RESOLUTION_AREAS, {640: LAYERED_AREA}))
    stack.enter_context(mock.patch.object(caption, "MAX_NEW_TOKENS", LAYERED_CAPTION_TOKENS))
    return stack


def _exact_size():
    """Qwen-Image 2.1's output size taken as given (a multiple of 16) for the call, not floored to 32 (Q21_UNEVEN)."""
    import warnings
    from contextlib import ExitStack
    from unittest import mock

    import qistudio.request21 as request21

    stack = ExitStack()
    stack.enter_context(mock.patch.object(request21, "output_size", lambda height, width, images, resolution:
                                          (height, width)))
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", "height and width must be multiples of 32")  # not floored here
    return stack


def fp8_pipeline(repo: str, controlnets: list[str]):
    """The demo pipeline under FP8 compute (for the cases marked fp8)."""
    pipe = load_pipeline(repo, controlnets)
    pipe.enable_fp8_computation()
    return pipe


def generate(pipe, name: str, **overrides) -> torch.Tensor:
    """Case `name`'s latents from `pipe` (parallel or not), with its LoRA loaded and VRAM management on for the
    call where it says so; an fp8 case's `pipe` is fp8_pipeline's, its FP8 attention in the CPU reference form."""
    from contextlib import nullcontext

    from lora_files import peft_layout, random_pairs

    from qistudio.ops.fp8_attention import fp8_attention_reference

    lora, vram, scale = CASES[name][1].get("lora"), CASES[name][1].get("vram"), CASES[name][1].get("layered")
    exact = CASES[name][1].get("exact_size")
    if lora:
        pipe.load_lora(pipe.dit, state_dict=peft_layout(random_pairs(pipe.dit, seed=5)), fuse=lora == "fused")
    if vram is not None:
        pipe.enable_vram_management(**vram)
    try:
        with fp8_attention_reference() if CASES[name][1].get("fp8") else nullcontext(), \
                _layered_scale() if scale else nullcontext(), _exact_size() if exact else nullcontext():
            return pipe(**{**call_arguments(name), **overrides})
    finally:
        if lora:
            pipe.unload_lora()
        if vram is not None:
            pipe.disable_vram_management()


def as_tensors(result) -> dict[str, torch.Tensor]:
    """A call's result as tensors to save: latents, an image's pixels (layers': stacked), or a mark for None."""
    if result is None:
        return {"none": torch.zeros(1)}
    if isinstance(result, Image.Image):
        return {"pixels": torch.from_numpy(np.asarray(result).copy())}
    if isinstance(result, list):  # Layered's RGBA layers
        return {"pixels": torch.from_numpy(np.stack([np.asarray(layer) for layer in result]))}
    return {"latents": result.contiguous()}


def _save(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path.with_suffix(".tmp")), metadata=metadata)
    path.with_suffix(".tmp").rename(path)  # whole or absent


def run_cases(repo: str, controlnets: list[str], out_dir: str, names: list[str], kill: bool = False,
              repo21: str | None = None, repo_layered: str | None = None) -> None:
    """One rank: each case's latents under its degrees, saved by every rank (the ranks must agree). With `kill`,
    a last call in which rank 1 is killed at step 1 (SIGKILL): rank 0 records the error it got and how long it
    took. The launcher would stop rank 0 at once when rank 1 dies; rank 0 ignores that (SIGTERM) here to show what
    it does by itself, as under a launcher that does not (srun, mpirun), then ends."""
    import json
    import os
    import signal
    import time

    import torch.distributed as dist

    torch.set_num_threads(1)
    plain_pipe, fp8_pipe, pipe21, layered_pipe = load_pipeline(repo, controlnets), None, None, None
    rank = int(os.environ["RANK"])
    for name in names:
        pipe = plain_pipe
        if CASES[name][1].get("fp8"):
            fp8_pipe = fp8_pipe or fp8_pipeline(repo, controlnets)
            pipe = fp8_pipe
        if CASES[name][1].get("qwen21"):
            pipe21 = pipe21 or load_pipeline21(repo21)
            pipe = pipe21
        if CASES[name][1].get("layered"):
            layered_pipe = layered_pipe or load_layered(repo_layered)
            pipe = layered_pipe
        if CASES[name][1].get("compile") and getattr(pipe.dit.transformer_blocks[0], "_compiled_call_impl",
                                                     None) is None:
            from qistudio.compile import compile_repeated_blocks

            compile_repeated_blocks(pipe.dit, backend="aot_eager")
        degrees = CASES[name][0]
        pipe.enable_parallelism(degrees, timeout=60) if degrees == "auto" else pipe.enable_parallelism(**degrees,
                                                                                                        timeout=60)
        path = Path(out_dir) / f"{name}.rank{dist.get_rank()}.safetensors"
        if name in REFUSED:
            try:
                generate(pipe, name)
                _save(path, as_tensors(None), {"error": ""})
            except Exception as error:  # noqa: BLE001 - recorded for the test to judge
                _save(path, as_tensors(None), {"error": type(error).__name__, "message": str(error)})
            continue
        result = as_tensors(generate(pipe, name))
        _save(path, result, {"degrees": pipe.parallel.degrees.text(),  # its layout, and its step cache's decisions
                             "cache": json.dumps(pipe.last_cache_report),
                             "seed": json.dumps(getattr(pipe, "last_seed", None)),
                             "caption": json.dumps(pipe.last_request.extras.get("caption"))})
    if not kill:
        return
    pipe = plain_pipe
    pipe.enable_parallelism(ulysses=2, timeout=20)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def die(step, sigma, latents):
        if rank == 1 and step == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    start = time.monotonic()
    try:
        generate(pipe, "ulysses2", callback=die)
        outcome = {"error": None}
    except Exception as error:  # noqa: BLE001 - recorded for the test to judge
        outcome = {"error": type(error).__name__, "message": str(error)}
    outcome["seconds"] = time.monotonic() - start
    (Path(out_dir) / f"killed.rank{rank}.json").write_text(json.dumps(outcome))
    os._exit(0)  # the launcher is ending this run: no return value to hand back
