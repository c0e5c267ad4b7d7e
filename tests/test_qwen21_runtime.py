"""Qwen-Image 2.1 through the existing memory code on the CPU: every VRAM plan (offload, block streaming, the
smallest budget, blocks streamed from disk) gives the plain result exactly; FP8 storage of the DiT's blocks and of
the Qwen3-VL decoder layers stays within FP8's rounding; a LoRA file through pipe.load_lora unloads exactly."""

import pytest
import torch

from conftest import rel_err
from lora_files import peft_layout, random_pairs
from qistudio import ModelConfig, QwenImagePipeline
from qistudio.memory.fp8_linear import FP8Linear
from qistudio.memory.manager import MemoryManager
from qistudio.memory.plan import MemoryPlan, ModelPlan
from tiny_qwen21 import model_configs21, tiny_repository21

CALL = dict(edit_image=None, height=64, width=64, num_inference_steps=2, negative_prompt="", cfg_scale=2.5, seed=4,
            output_type="latent", progress_bar_cmd=lambda steps: steps)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return tiny_repository21(tmp_path_factory)


def _pipe(repo, **offload):
    configs = model_configs21(repo)
    for config in configs:
        for key, value in offload.items():
            setattr(config, key, value)
    return QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs,
                                             tokenizer_config=None,
                                             processor_config=ModelConfig(path=str(repo / "processor")))


@pytest.fixture(scope="module")
def pipe(repo):
    return _pipe(repo)


@pytest.fixture(scope="module")
def plain(pipe):
    from PIL import Image

    call = dict(CALL, edit_image=[Image.new("RGBA", (64, 48), (200, 30, 30, 128))], output_resolution=64)
    return call, pipe("a red kite", **call)


PLANS = {
    "offload": {"text_encoder": ModelPlan("offload"), "dit": ModelPlan("offload"), "vae": ModelPlan("offload")},
    "stream": {"text_encoder": ModelPlan("stream", 1, 2), "dit": ModelPlan("stream", 1, 2), "vae": ModelPlan("offload")},
    "minimal": {"text_encoder": ModelPlan("stream", 0, 2), "dit": ModelPlan("stream", 0, 2),
                "vae": ModelPlan("offload")},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PLANS))
def test_every_plan_gives_the_plain_result(pipe, plain, name):
    call, expected = plain
    pipe.components.memory = MemoryManager(pipe.components.models, "cpu", MemoryPlan(1, PLANS[name], tiled_vae=False))
    try:
        assert torch.equal(pipe("a red kite", **call), expected)
        assert torch.equal(pipe("a red kite", **call), expected)  # and again, the weights back in place
    finally:
        pipe.disable_vram_management()
    assert torch.equal(pipe("a red kite", **call), expected)


def test_the_smallest_budget_streams_everything(pipe, plain):
    call, expected = plain
    plan = pipe.enable_vram_management(vram_limit=0)
    try:
        assert plan.models["dit"].mode == "stream" and plan.models["dit"].resident_blocks == 0
        assert torch.equal(pipe("a red kite", **call), expected)
    finally:
        pipe.disable_vram_management()


def test_blocks_streamed_from_disk(repo, plain):
    call, expected = plain
    streamed = _pipe(repo, offload_device="disk")
    assert set(streamed.components.disk_sources) == {"dit", "text_encoder"}
    assert torch.equal(streamed("a red kite", **call), expected)


def test_fp8_storage_of_dit_and_text_encoder(repo, plain):
    call, expected = plain
    fp8 = _pipe(repo, offload_device="cpu", offload_dtype=torch.float8_e4m3fn)
    got = fp8("a red kite", **call)  # the first call plans memory and stores the FP8 weights
    assert isinstance(fp8.dit.transformer_blocks[0].img_mlp.gate_layer, FP8Linear)
    assert isinstance(fp8.dit.transformer_blocks[1].attn.to_q, FP8Linear)
    assert not isinstance(fp8.dit.modulation[1], FP8Linear)  # top-level layers keep the compute dtype
    assert isinstance(fp8.text_encoder.model.language_model.layers[0].mlp.up_proj, FP8Linear)
    assert 0 < rel_err(got, expected) < 0.02  # FP8 rounding only (measured 0.19% on these tiny models)


def test_lora_file_through_the_pipeline_unloads_exactly(pipe, plain, tmp_path):
    from safetensors.torch import save_file

    call, expected = plain
    pairs = random_pairs(pipe.dit, ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.out",
                                    "modulation.1"))
    path = tmp_path / "style.safetensors"
    save_file(peft_layout(pairs, prefix="transformer."), str(path))
    name = pipe.load_lora(pipe.dit, str(path))
    try:
        assert rel_err(pipe("a red kite", **call), expected) > 1e-3
    finally:
        pipe.unload_lora(name)
    assert torch.equal(pipe("a red kite", **call), expected)
