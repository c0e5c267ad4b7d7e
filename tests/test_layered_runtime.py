"""Layered through the library's runtime options, each against the plain path: a LoRA on its DiT (the extra
timestep row is not a linear, so no LoRA touches it), FP8 storage with VRAM management, regional compile."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import qistudio.conditioning.layered as layered
from conftest import rel_err
from lora_files import peft_layout, random_pairs
from qistudio import ModelConfig, QwenImagePipeline
from tiny_layered import layered_dit, load_layered_pipe, write_tiny_layered

KWARGS = dict(layers=2, num_inference_steps=2, negative_prompt="blurry", seed=4, output_type="latent",
              progress_bar_cmd=lambda x: x)


@pytest.fixture(autouse=True)
def small_working_area(monkeypatch):
    monkeypatch.setattr(layered, "RESOLUTION_AREAS", {k: v // 64 for k, v in layered.RESOLUTION_AREAS.items()})


@pytest.fixture(scope="module")
def layered_repo(tiny_repo, tmp_path_factory):
    return write_tiny_layered(tmp_path_factory.mktemp("Qwen-Image-Layered"), tiny_repo)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(9).integers(0, 256, (64, 96, 4), dtype=np.uint8), "RGBA")


def test_lora_on_the_layered_dit_and_back(layered_repo, image, tmp_path):
    pipe = load_layered_pipe(layered_repo)
    plain = pipe("a kite", image=image, **KWARGS)
    path = tmp_path / "layered_lora.safetensors"
    save_file(peft_layout(random_pairs(layered_dit(), seed=2), prefix="transformer.", alpha=None), str(path))
    name = pipe.load_lora(pipe.dit, str(path))
    with_lora = pipe("a kite", image=image, **KWARGS)
    assert rel_err(with_lora, plain) > 1e-3
    pipe.unload_lora(name)
    assert torch.equal(pipe("a kite", image=image, **KWARGS), plain)


def test_fp8_storage_with_vram_management_stays_close(layered_repo, image):
    plain = load_layered_pipe(layered_repo)("a kite", image=image, **KWARGS)
    offload = dict(offload_device="cpu", offload_dtype=torch.float8_e4m3fn)
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(layered_repo / name), **offload)
                       for name in ("transformer", "text_encoder", "vae")],
        tokenizer_config=ModelConfig(path=str(layered_repo / "tokenizer")),
        processor_config=ModelConfig(path=str(layered_repo / "processor")),
    )
    pipe.enable_vram_management()
    assert type(pipe.dit.transformer_blocks[0].attn.to_q).__name__ == "FP8Linear"
    stored = pipe("a kite", image=image, **KWARGS)
    assert rel_err(stored, plain) < 0.05  # FP8 weights: the same latents within FP8 rounding


def test_compiled_blocks_equal_eager(layered_repo, image):
    from qistudio.compile import compile_repeated_blocks

    pipe = load_layered_pipe(layered_repo)
    eager = pipe("a kite", image=image, **KWARGS)
    assert compile_repeated_blocks(pipe.dit, backend="aot_eager") == pipe.dit.config.num_layers
    assert rel_err(pipe("a kite", image=image, **KWARGS), eager) < 1e-5
