"""VRAM management on the CPU: every plan gives the plain path's result; the planner's choices and refusals.

Streams and pinned memory only exist on a GPU; there the same code paths run with real overlap (bench/offload.py).
"""

import pytest
import torch

from conftest import rel_err
from lora_files import Inputs, our_dit
from qistudio.memory.manager import MemoryManager, model_size
from qistudio.memory.offload import BlockStreamer, ModelOffload, spread
from qistudio.memory.plan import GiB, MemoryPlan, ModelPlan, ModelSize, plan_memory
from tiny_models import reference_dit

QUIET = dict(progress_bar_cmd=lambda x: x, output_type="latent", height=64, width=48, num_inference_steps=2)
# The real models' sizes in bf16 (bytes, from ../shared/reference/checkpoints): DiT 60 blocks; text encoder 28
# layers plus 32 vision blocks (lm_head not loaded).
DIT = ModelSize(40_860_802_176, 679_662_592, 60, int(1.5 * GiB))
TEXT_ENCODER = ModelSize(15_494_338_560, 466_115_584, 28, int(0.5 * GiB), other_block_bytes=1_260_940_800,
                         other_slot_bytes=2 * 39_404_400)
VAE = ModelSize(253_785_062, activation_bytes=6 * GiB)
REAL = {"text_encoder": TEXT_ENCODER, "dit": DIT, "vae": VAE}


def test_spread_interleaves_streamed_blocks():
    assert spread(6, 3) == [0, 2, 4] and spread(4, 4) == [0, 1, 2, 3] and spread(4, 0) == []
    assert len(spread(60, 29)) == 29


@pytest.mark.parametrize("streamed, slots", [([0, 1], 2), ([1], 1), ([0, 1], 1)])
def test_block_streaming_equals_resident(streamed, slots):
    inputs = Inputs()
    dit = our_dit(reference_dit())
    expected = inputs.ours(dit)
    rest = ModelOffload(dit, "cpu", exclude=tuple(dit.transformer_blocks[i] for i in streamed))
    streamer = BlockStreamer(dit.transformer_blocks, "cpu", streamed, num_slots=slots).attach()
    rest.onload()
    for _ in range(2):  # the second call starts from the block prefetched at the end of the first
        assert torch.equal(inputs.ours(dit), expected)
    streamer.detach()
    rest.offload()
    assert torch.equal(inputs.ours(dit), expected)  # host copies hold the same bits


def test_offloaded_parameters_keep_their_identity():
    dit = our_dit(reference_dit())
    params = dict(dit.named_parameters())
    offload = ModelOffload(dit, "cpu")
    offload.onload()
    assert all(p is params[n] for n, p in dit.named_parameters())
    assert offload.nbytes >= sum(p.numel() * p.element_size() for p in params.values())


def _plans():
    return {
        "resident": {"text_encoder": ModelPlan("resident"), "dit": ModelPlan("resident"), "vae": ModelPlan("resident")},
        "offload": {"text_encoder": ModelPlan("offload"), "dit": ModelPlan("offload"), "vae": ModelPlan("offload")},
        "stream": {"text_encoder": ModelPlan("stream", 1, 2), "dit": ModelPlan("stream", 1, 2),
                   "vae": ModelPlan("offload")},
        "minimal": {"text_encoder": ModelPlan("stream", 0, 2), "dit": ModelPlan("stream", 0, 2),
                    "vae": ModelPlan("offload")},
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(_plans()))
def test_every_plan_gives_the_plain_result(tiny_pipe, name):
    kwargs = dict(negative_prompt="blur", cfg_scale=3.0, seed=1, **QUIET)
    plain = tiny_pipe("a lighthouse", **kwargs)
    plan = MemoryPlan(1, _plans()[name], tiled_vae=False)
    tiny_pipe.components.memory = MemoryManager(tiny_pipe.components.models, "cpu", plan)
    try:
        managed = tiny_pipe("a lighthouse", **kwargs)
        again = tiny_pipe("a lighthouse", **kwargs)
    finally:
        tiny_pipe.disable_vram_management()
    assert torch.equal(managed, plain) and torch.equal(again, plain)
    assert torch.equal(tiny_pipe("a lighthouse", **kwargs), plain)  # and back to normal


def test_tiled_vae_plan_decodes_in_tiles(tiny_pipe):
    kwargs = dict(seed=2, height=256, width=256, num_inference_steps=1, progress_bar_cmd=lambda x: x)
    tiled = tiny_pipe("a field", tiled=True, tile_size=16, tile_stride=8, output_type="latent", **{k: v for k, v in
                      kwargs.items()})
    plan = MemoryPlan(1, {"text_encoder": ModelPlan("offload"), "dit": ModelPlan("offload"),
                          "vae": ModelPlan("offload")}, tiled_vae=True)
    tiny_pipe.components.memory = MemoryManager(tiny_pipe.components.models, "cpu", plan)
    try:
        from qistudio.pipeline import decode

        request = tiny_pipe.last_request
        request.tile_size, request.tile_stride = 16, 8
        managed = decode(tiny_pipe.components, request, tiled)
    finally:
        tiny_pipe.disable_vram_management()
    request.tiled = True
    expected = decode(tiny_pipe.components, request, tiled)
    assert all((a.tobytes() == b.tobytes()) for a, b in zip(managed, expected))


def test_enable_vram_management_on_the_cpu(tiny_pipe):
    kwargs = dict(seed=3, **QUIET)
    plain = tiny_pipe("a boat", **kwargs)
    plan = tiny_pipe.enable_vram_management(vram_limit=0)  # the smallest footprint: stream everything
    try:
        assert plan.models["dit"].mode == "stream" and plan.models["dit"].resident_blocks == 0 and plan.tiled_vae
        assert torch.equal(tiny_pipe("a boat", **kwargs), plain)
    finally:
        tiny_pipe.disable_vram_management()
    plan = tiny_pipe.enable_vram_management(num_persistent_param_in_dit=0)
    try:
        assert plan.models["dit"].mode == "stream" and plan.models["dit"].resident_blocks == 0
        assert torch.equal(tiny_pipe("a boat", **kwargs), plain)
    finally:
        tiny_pipe.disable_vram_management()
    with pytest.raises(ValueError, match="vram_limit must be >= 0"):
        tiny_pipe.enable_vram_management(vram_limit=-1)


def test_plans_for_the_real_sizes():
    everything = plan_memory(80 * GiB, REAL, 1 * GiB)
    assert {p.mode for p in everything.models.values()} == {"resident"} and not everything.tiled_vae
    at_48 = plan_memory(48 * GiB, REAL, 1 * GiB)  # the DiT fits alone: models take turns
    assert at_48.models["dit"].mode == "offload" and at_48.models["vae"].mode == "resident"
    at_24 = plan_memory(24 * GiB, REAL, 1 * GiB)
    dit = at_24.models["dit"]
    assert dit.mode == "stream" and dit.resident_blocks == 33  # (24 GiB - slots - activations) / 0.68 GB
    assert at_24.models["text_encoder"].mode == "offload" and not at_24.tiled_vae
    at_4 = plan_memory(4 * GiB, REAL, 1 * GiB)
    assert at_4.models["dit"].resident_blocks <= 1 and at_4.models["text_encoder"].mode == "stream"
    assert at_4.tiled_vae
    minimal = plan_memory(0, REAL, 1 * GiB)
    assert all(p.resident_blocks == 0 for p in minimal.models.values()) and minimal.tiled_vae
    assert "dit: stream (0/60 blocks resident)" in minimal.describe()


def test_too_small_a_budget_names_the_smallest_workable_one():
    with pytest.raises(ValueError, match=r"cannot run the dit .* smallest workable budget is 2\.84 GiB"):
        plan_memory(2 * GiB, REAL, 1 * GiB)


def test_model_size_counts_blocks(tiny_pipe):
    size = model_size("dit", tiny_pipe.dit)
    blocks = tiny_pipe.dit.transformer_blocks
    assert size.num_blocks == len(blocks) and size.block_bytes * len(blocks) < size.total_bytes
    assert rel_err(torch.tensor(float(size.total_bytes)),
                   torch.tensor(float(sum(p.numel() * 4 for p in tiny_pipe.dit.parameters())))) < 1e-6


def test_lora_with_streaming_and_fuse_into_host_weights(tiny_pipe, tmp_path):
    """Outside a call managed weights are their host copies: a LoRA fused then lands in what streams."""
    from safetensors.torch import save_file

    from lora_files import down_up_layout, random_pairs

    path = tmp_path / "style.safetensors"
    save_file(down_up_layout(random_pairs(tiny_pipe.dit, seed=4)), str(path))
    kwargs = dict(seed=5, **QUIET)
    tiny_pipe.load_lora(tiny_pipe.dit, str(path))
    try:
        expected = tiny_pipe("a kite", **kwargs)
        plan = MemoryPlan(1, _plans()["minimal"])
        tiny_pipe.components.memory = MemoryManager(tiny_pipe.components.models, "cpu", plan)
        assert torch.equal(tiny_pipe("a kite", **kwargs), expected)  # unfused LoRA on streamed blocks
        tiny_pipe.clear_lora()
        tiny_pipe.load_lora(tiny_pipe.dit, str(path), fuse=True)
        assert rel_err(tiny_pipe("a kite", **kwargs), expected) < 1e-5  # fused into the host copies
    finally:
        tiny_pipe.disable_vram_management()
        tiny_pipe.clear_lora()


def test_disk_offload_streams_blocks_from_the_files(tiny_repo, tiny_pipe):
    """offload_device="disk": the blocks are never held in memory; each use reads them from the checkpoint."""
    from qistudio import ModelConfig, QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[
            ModelConfig(path=str(tiny_repo / "transformer"), offload_device="disk"),
            ModelConfig(path=str(tiny_repo / "text_encoder"), offload_device="disk"),
            ModelConfig(path=str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors"), offload_device="cpu"),
        ],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )  # fmt: skip
    block_params = list(pipe.dit.transformer_blocks.parameters())
    assert all(p.numel() == 0 for p in block_params)  # placeholders: nothing read yet
    kwargs = dict(negative_prompt="fog", cfg_scale=2.0, seed=6, **QUIET)
    assert torch.equal(pipe("a harbour", **kwargs), tiny_pipe("a harbour", **kwargs))
    assert pipe.components.memory.plan.models["dit"].mode == "stream"
    assert all(p.numel() == 0 for p in block_params)  # and nothing kept after the call
    text_layers = pipe.text_encoder.model.language_model.layers.parameters()
    assert all(p.numel() == 0 for p in text_layers)


def test_enable_dit_fp8_computation_quantises_the_blocks(tiny_repo, tiny_pipe):
    from qistudio import ModelConfig, QwenImagePipeline
    from qistudio.memory.fp8_linear import FP8Linear

    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(tiny_repo / name)) for name in ("transformer", "text_encoder", "vae")],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )  # fmt: skip
    pipe.enable_vram_management(enable_dit_fp8_computation=True)
    layer = pipe.dit.transformer_blocks[0].img_mlp.net[2]
    assert isinstance(layer, FP8Linear) and layer.fp8_compute
    kwargs = dict(seed=7, **QUIET)
    assert rel_err(pipe("a tower", **kwargs), tiny_pipe("a tower", **kwargs)) < 0.05  # FP8 rounding only
