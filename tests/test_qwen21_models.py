"""Qwen-Image 2.1's VAE and Qwen3-VL text encoder loaded through our loaders equal the reference classes that wrote
them; the offline Qwen3-VL tokenizer and processor are Qwen3's."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import rel_err
from qistudio.models.text_encoder21 import QwenImage21TextEncoder, text_encoder21_config_from_shapes
from qistudio.models.vae21 import QwenImage21VAE, VAE21Config
from qistudio.weights.build import load_model
from qistudio.weights.formats import detect_layout
from tiny_qwen21 import PROCESSOR_SIZE, reference_text_encoder21, reference_vae21, save


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    reference = reference_vae21()
    folder = save(reference, tmp_path_factory.mktemp("qwen21_vae"))
    kind, ours = load_model([folder / "diffusion_pytorch_model.safetensors"], dtype=torch.float32)
    assert kind == "vae" and isinstance(ours, QwenImage21VAE)
    return reference, ours


def _stats(reference):
    shape = (1, -1, 1, 1)
    return (torch.tensor(reference.config.latents_mean).view(shape),
            torch.tensor(reference.config.latents_std).view(shape))


def test_vae_encode_matches_diffusers(vaes):
    reference, ours = vaes
    images = torch.rand(2, 4, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1  # RGBA
    mean, std = _stats(reference)
    with torch.no_grad():
        expected = (reference.encode(images[:, :, None]).latent_dist.mode()[:, :, 0] - mean) / std
        got = ours.encode(images)
    assert got.shape == (2, 16, 4, 6)
    assert rel_err(got, expected) <= 1e-5


def test_vae_decode_matches_diffusers(vaes):
    reference, ours = vaes
    latents = torch.randn(1, 16, 5, 3, generator=torch.Generator().manual_seed(1))
    mean, std = _stats(reference)
    with torch.no_grad():
        expected = reference.decode((latents * std + mean)[:, :, None]).sample[:, :, 0]
        got = ours.decode(latents)
    assert got.shape == (1, 4, 80, 48)
    assert rel_err(got, expected) <= 1e-5


def test_vae_tiled_decode_is_its_tiles_blended(vaes):
    _, ours = vaes
    latents = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = ours.decode(latents)
        assert torch.equal(ours.decode(latents, tiled=True, tile_size=8, tile_stride=6), whole)  # one tile
        tiled = ours.decode(latents, tiled=True, tile_size=4, tile_stride=3)
        first_tile = ours.decode(latents[..., :4, :4])
    assert tiled.shape == whole.shape
    # Latent rows/columns 0-2 lie in the first tile only (the next starts at 3): those pixels are that tile's.
    assert rel_err(tiled[..., :48, :48], first_tile[..., :48, :48]) <= 1e-6
    with pytest.raises(ValueError, match="multiple of 16"):
        ours.encode(torch.zeros(1, 4, 40, 64))


def test_vae_config_from_shapes_alone():
    reference = reference_vae21()
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    config = VAE21Config.from_shapes(shapes)
    assert (config.base_dim, config.decoder_base_dim, config.dim_mult, config.num_res_blocks) == (8, 12, (1, 2, 4, 4, 4), 1)
    assert config.temporal_downsample == (False, True, True, True) and config.image_channels == 4
    assert detect_layout(shapes).name == "Qwen-Image-2.1 VAE (diffusers)"


@pytest.fixture(scope="module")
def text_encoders(tmp_path_factory):
    reference = reference_text_encoder21()
    folder = save(reference, tmp_path_factory.mktemp("qwen21_text_encoder"))
    kind, ours = load_model(sorted(folder.glob("*.safetensors")), dtype=torch.float32)
    assert kind == "text_encoder" and isinstance(ours, QwenImage21TextEncoder)
    return reference, ours


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoProcessor

    from qistudio.tokenizer_build21 import write_qwen3_vl_processor

    return AutoProcessor.from_pretrained(write_qwen3_vl_processor(tmp_path_factory.mktemp("proc"), size=PROCESSOR_SIZE))


def test_text_encoder_returns_the_states_before_the_final_norm(text_encoders, processor):
    reference, ours = text_encoders
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    texts = ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a fox<|im_end|>\n",
             "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a longer prompt about a fox<|im_end|>\n"]
    inputs = processor(text=texts, images=[image, image], padding=True, padding_side="left", return_tensors="pt")
    norm = reference.model.language_model.norm
    # The reference pipeline's own way: a hook that returns the norm's input in place of its output.
    handle = norm.register_forward_hook(lambda module, args, output: args[0])
    with torch.no_grad():
        try:
            expected = reference(**inputs, output_hidden_states=True).hidden_states[-1]
        finally:
            handle.remove()
        got = ours(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"],
                   inputs["mm_token_type_ids"])
    valid = inputs["attention_mask"].bool()
    assert rel_err(got[valid], expected[valid]) <= 1e-5
    assert not torch.allclose(got[valid], norm(got)[valid], atol=1e-3)  # the norm really is skipped


def test_text_encoder_config_from_the_released_shapes():
    from transformers import Qwen3VLConfig, Qwen3VLModel

    from qistudio.weights.build import empty_parameters

    config = Qwen3VLConfig(text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                            num_attention_heads=32, num_key_value_heads=8, head_dim=128),
                           vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                                              out_hidden_size=4096, num_position_embeddings=2304))
    with empty_parameters():
        model = Qwen3VLModel(config)
    shapes = {"model." + k: tuple(p.shape) for k, p in model.named_parameters()}
    got = text_encoder21_config_from_shapes(shapes)
    assert (got.text_config.num_hidden_layers, got.text_config.num_key_value_heads) == (36, 8)
    assert (got.vision_config.num_heads, got.vision_config.spatial_merge_size) == (16, 2)
    assert got.vision_config.deepstack_visual_indexes == [8, 16, 24]
    assert got.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    assert detect_layout(shapes).name == "Qwen3-VL (Qwen-Image-2.1 text encoder)"
    del shapes["model.visual.deepstack_merger_list.2.norm.weight"]
    with pytest.raises(ValueError, match="config.json"):
        text_encoder21_config_from_shapes({k: v for k, v in shapes.items() if "merger_list.2" not in k})


def test_qwen3_tokenizer_adds_four_tokens_and_renders_the_system_turn(processor):
    tokenizer = processor.tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<tool_response>", "</tool_response>",
                                                           "<think>", "</think>")}
    assert ids == {"<|image_pad|>": 151655, "<tool_response>": 151665, "</tool_response>": 151666,
                   "<think>": 151667, "</think>": 151668}
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    system = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]
    rendered = processor.apply_chat_template(system, tokenize=False)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n"
    conversation = system + [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    # One vision token per 32x32 pixels: 16-pixel patches merged 2x2.
    image = Image.new("RGB", (96, 64))
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert int((inputs["input_ids"] == 151655).sum()) == 6


def test_released_dit_and_vae_are_read_from_their_shapes_alone():
    """The full-size 2.1 DiT and VAE (diffusers' defaults are the released configuration) built on the meta
    device: names and shapes alone give our released configs, and the layouts are named."""
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel

    from qistudio.models.dit21 import DiT21Config, dit21_config_from_shapes
    from qistudio.weights.build import build_empty

    with torch.device("meta"):
        dit, vae = QwenImage21Transformer2DModel(), AutoencoderKLQwenImage21()
    dit_shapes = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    vae_shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert dit21_config_from_shapes(dit_shapes) == DiT21Config()
    assert sum(p.numel() for p in dit.parameters()) / 1e9 == pytest.approx(7.0, abs=0.5)
    assert VAE21Config.from_shapes(vae_shapes) == VAE21Config()  # with the released latent statistics
    assert detect_layout(dit_shapes).name == "Qwen-Image-2.1 DiT (diffusers)"
    assert detect_layout({"model.diffusion_model." + k for k in dit_shapes}).name.startswith("Qwen-Image-2.1 DiT")
    ours = build_empty("dit", dit_shapes, None)
    assert {k: tuple(p.shape) for k, p in ours.named_parameters()} == dit_shapes
    ours = build_empty("vae", vae_shapes, None)
    assert {k: tuple(p.shape) for k, p in ours.named_parameters()} == vae_shapes
