"""Qwen-Image-Layered through every runtime feature Qwen-Image has, each against the plain path on one shared tiny
pipeline (float32, CPU): LoRA files in the layouts people publish (diffusers / PEFT, DiffSynth, ComfyUI) change the
layers exactly as the same weights merged by hand; VRAM budgets (streaming, offload, disk) give the resident layers;
FP8 storage equals its dequantised weights and FP8 compute stays within FP8 rounding; compiled blocks equal eager
with no recompilation across steps or calls; step caching skips as scheduled and never skipping is the plain path."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import qistudio.conditioning.layered as layered
from conftest import rel_err
from lora_files import down_up_layout, merged, peft_layout, random_pairs
from qistudio import ModelConfig, QwenImagePipeline
from qistudio.caching import DBCache, FirstBlockCache, FixedSchedule
from qistudio.memory.fp8_linear import FP8Linear
from qistudio.memory.manager import MemoryManager
from qistudio.memory.plan import MemoryPlan, ModelPlan
from test_layered_parity import layered_repo, pipe  # noqa: F401 (module fixtures: the tiny repo, our pipeline)
from tiny_layered import load_layered_pipe

pytestmark = pytest.mark.usefixtures("one_thread")
KWARGS = dict(layers=2, num_inference_steps=3, negative_prompt="blurry", cfg_scale=3.0, seed=4, output_type="latent",
              progress_bar_cmd=lambda x: x)
MODELS = ("transformer", "text_encoder", "vae")


@pytest.fixture(scope="module", autouse=True)
def small_working_area():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layered, "RESOLUTION_AREAS", {k: v // 64 for k, v in layered.RESOLUTION_AREAS.items()})
        yield


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(9).integers(0, 256, (64, 96, 4), dtype=np.uint8), "RGBA")


@pytest.fixture(scope="module")
def plain(pipe, image):
    return pipe("a kite", image=image, **KWARGS)


def load_with(repo, dit_dtype=None, **options) -> QwenImagePipeline:
    """The tiny Layered pipeline with `options` on every ModelConfig; `dit_dtype` the DiT's offload_dtype."""
    dtypes = {"transformer": dit_dtype} if dit_dtype is not None else {}
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(repo / name), **options, **({"offload_dtype": dtypes[name]}
                                                                       if name in dtypes else {}))
                       for name in MODELS],
        tokenizer_config=ModelConfig(path=str(repo / "tokenizer")),
        processor_config=ModelConfig(path=str(repo / "processor")),
    )


def with_weights(pipe, state: dict, run):
    """run() with the DiT holding `state`, its own weights back afterwards."""
    own = copy.deepcopy(pipe.dit.state_dict())
    pipe.dit.load_state_dict(state)
    try:
        return run()
    finally:
        pipe.dit.load_state_dict(own)


# -- LoRA ---------------------------------------------------------------------------------------------------------
LAYOUTS = {  # name -> (state dict from pairs, the factor merged: alpha / rank, 1 without alpha)
    "diffusers": (lambda pairs: peft_layout(pairs, prefix="transformer.", alpha=None), 1.0),
    "diffsynth": (lambda pairs: peft_layout(pairs, alpha=None), 1.0),
    "peft-alpha": (lambda pairs: peft_layout(pairs, prefix="base_model.model.", alpha=8.0), 2.0),
    "comfyui": (lambda pairs: down_up_layout(pairs, prefix="diffusion_model.", alpha=8.0), 2.0),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_lora_file_changes_the_layers_as_its_merged_weights_do(pipe, image, plain, layout, tmp_path):
    from safetensors.torch import save_file

    write, factor = LAYOUTS[layout]
    pairs = random_pairs(pipe.dit, seed=5)
    path = tmp_path / f"{layout}.safetensors"
    save_file(write(pairs), str(path))
    name = pipe.load_lora(pipe.dit, str(path))
    try:
        hooked = pipe("a kite", image=image, **KWARGS)
    finally:
        pipe.unload_lora(name)
    expected = with_weights(pipe, merged(pipe.dit, pairs, factor), lambda: pipe("a kite", image=image, **KWARGS))
    assert rel_err(hooked, expected) <= 1e-5 and rel_err(hooked, plain) > 1e-3
    name = pipe.load_lora(pipe.dit, str(path), fuse=True)
    try:
        assert rel_err(pipe("a kite", image=image, **KWARGS), expected) <= 1e-5
    finally:
        pipe.unload_lora(name)
    assert torch.equal(pipe("a kite", image=image, **KWARGS), plain)  # the exact base weights back


# -- low VRAM -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("plan", ["stream-all", "stream-one", "offload"])
def test_memory_plans_give_the_resident_layers(pipe, image, plain, plan):
    models = {
        "stream-all": {"text_encoder": ModelPlan("stream", 0, 2), "dit": ModelPlan("stream", 0, 2),
                       "vae": ModelPlan("offload")},
        "stream-one": {"text_encoder": ModelPlan("offload"), "dit": ModelPlan("stream", 1, 2),
                       "vae": ModelPlan("offload")},
        "offload": {name: ModelPlan("offload") for name in ("text_encoder", "dit", "vae")},
    }[plan]
    pipe.components.memory = MemoryManager(pipe.components.models, "cpu", MemoryPlan(1, models, tiled_vae=False))
    try:
        assert torch.equal(pipe("a kite", image=image, **KWARGS), plain)
        assert torch.equal(pipe("a kite", image=image, **KWARGS), plain)  # the second call from the kept state
    finally:
        pipe.disable_vram_management()


def test_a_vram_budget_and_the_seeds_knob_give_the_resident_layers(pipe, image, plain):
    decoded = pipe("a kite", image=image, **{**KWARGS, "output_type": "pil"})
    for settings in (dict(vram_limit=0), dict(num_persistent_param_in_dit=0)):
        memory_plan = pipe.enable_vram_management(**settings)
        try:
            assert memory_plan.models["dit"].mode == "stream" and memory_plan.models["dit"].resident_blocks == 0
            assert torch.equal(pipe("a kite", image=image, **KWARGS), plain)
            if settings.get("vram_limit") == 0:  # the smallest footprint tiles the VAE too: the same RGBA layers
                layers = pipe("a kite", image=image, **{**KWARGS, "output_type": "pil"})
                assert [np.asarray(a).tobytes() for a in layers] == [np.asarray(b).tobytes() for b in decoded]
        finally:
            pipe.disable_vram_management()


def test_blocks_streamed_from_the_files_give_the_resident_layers(layered_repo, image, plain):
    disk = load_with(layered_repo, offload_device="disk")
    assert all(p.numel() == 0 for p in disk.dit.transformer_blocks.parameters())  # nothing read yet
    assert torch.equal(disk("a kite", image=image, **KWARGS), plain)
    assert disk.components.memory.plan.models["dit"].mode == "stream"


# -- FP8 ------------------------------------------------------------------------------------------------------------
def dequantised_state(pipe, fp8_dit) -> dict:
    """The plain DiT's state with each FP8 linear's weight replaced by its dequantised one."""
    state = copy.deepcopy(pipe.dit.state_dict())
    for name, module in fp8_dit.named_modules():
        if isinstance(module, FP8Linear):
            state[f"{name}.weight"] = module.dequantized_weight(torch.float32)
    return state


def test_fp8_storage_equals_its_dequantised_weights(layered_repo, pipe, image, plain):
    stored = load_with(layered_repo, dit_dtype=torch.float8_e4m3fn, offload_device="cpu")
    stored.enable_vram_management()
    assert isinstance(stored.dit.transformer_blocks[0].attn.to_q, FP8Linear)
    ours = stored("a kite", image=image, **KWARGS)
    expected = with_weights(pipe, dequantised_state(pipe, stored.dit), lambda: pipe("a kite", image=image, **KWARGS))
    assert rel_err(ours, expected) <= 1e-5
    assert rel_err(ours, plain) < 0.05  # FP8 rounding only (as Qwen-Image's test_memory_offload)


@pytest.mark.parametrize("how", ["enable_fp8_computation", "vram_management"])
def test_fp8_compute_stays_within_fp8_rounding(layered_repo, image, plain, how):
    fp8 = load_layered_pipe(layered_repo)
    if how == "enable_fp8_computation":
        fp8.enable_fp8_computation()
    else:
        fp8.enable_vram_management(enable_dit_fp8_computation=True)
    layer = fp8.dit.transformer_blocks[1].img_mlp.net[2]
    assert isinstance(layer, FP8Linear) and layer.fp8_compute
    assert rel_err(fp8("a kite", image=image, **KWARGS), plain) < 0.05  # W8A8 falls back off the GPU (test_fp8_storage)


# -- compile --------------------------------------------------------------------------------------------------------
def test_compiled_blocks_equal_eager_and_compile_once(layered_repo, image, plain):
    """Regional compile (fullgraph, traced without code generation here): the eager latents, with guidance, and no
    new graph for more steps or another seed. (A prompt whose length changes the attention's form, padded or not,
    compiles as it does for Qwen-Image: torch's guards, not Layered's.)"""
    from torch._dynamo.utils import counters

    from qistudio.compile import compile_repeated_blocks

    torch._dynamo.reset()  # graphs of other tests' blocks would serve some calls: count from an empty cache
    compiled = load_layered_pipe(layered_repo)
    assert compile_repeated_blocks(compiled.dit, backend="aot_eager") == compiled.dit.config.num_layers
    assert rel_err(compiled("a kite", image=image, **KWARGS), plain) < 1e-5
    graphs = counters["stats"]["unique_graphs"]
    again = dict(KWARGS, num_inference_steps=5, seed=8)
    eager = load_layered_pipe(layered_repo)("a kite", image=image, **again)
    assert rel_err(compiled("a kite", image=image, **again), eager) < 1e-5
    assert counters["stats"]["unique_graphs"] == graphs


def test_pipe_compile_compiles_the_layered_blocks(layered_repo, monkeypatch):
    import qistudio.compile as compile_module

    seen = []
    monkeypatch.setattr(compile_module, "compile_repeated_blocks", lambda model, *a: seen.append(model) or 2)
    pipe = load_layered_pipe(layered_repo)
    assert pipe.compile() is pipe and seen == [pipe.dit]


# -- step caching ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_batch", [True, False])
def test_step_cache_skips_as_scheduled_and_never_skipping_is_plain(pipe, image, plain, cfg_batch):
    kwargs = dict(KWARGS, num_inference_steps=4, cfg_batch=cfg_batch)
    plain4 = pipe("a kite", image=image, **kwargs)
    never = pipe("a kite", image=image, cache=FirstBlockCache(threshold=0), **kwargs)
    assert rel_err(never, plain4) <= 1e-6
    assert pipe.last_cache_report["computed_steps"] == {"cond": [0, 1, 2, 3], "uncond": [0, 1, 2, 3]}
    fixed = pipe("a kite", image=image, cache="compute-every-2", **kwargs)
    assert pipe.last_cache_report["computed_steps"] == {"cond": [0, 2], "uncond": [0, 2]}
    assert torch.isfinite(fixed).all() and rel_err(fixed, plain4) > 1e-4
    dbcache = pipe("a kite", image=image, cache=DBCache(front_blocks=1, back_blocks=0, warmup_steps=1,
                                                        residual_diff_threshold=10.0), **kwargs)
    assert len(pipe.last_cache_report["computed_steps"]["cond"]) < 4 and torch.isfinite(dbcache).all()


def test_a_cache_that_does_not_fit_the_dit_is_one_error(pipe, image):
    from qistudio.validation import InputError

    with pytest.raises(InputError, match="front_blocks \\+ back_blocks = 3 exceeds the DiT's 2 blocks"):
        pipe("a kite", image=image, cache=FixedSchedule(every=2, front_blocks=2, back_blocks=1), **KWARGS)
