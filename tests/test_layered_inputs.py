"""Qwen-Image-Layered's inputs: what is refused (one message naming it, before any model runs), what is converted,
the compositing check, the schedule, and the models it needs."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from qistudio.conditioning.layered import (composite, composite_error, layered_input, pack_frames, rgba_tensor,
                                           unpack_frames)
from qistudio.request import build_request
from qistudio.sampling.layered_schedule import layered_sigmas
from qistudio.validation import InputError


def rgba(width=64, height=48, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=0), r"layers must be an integer in \[1, 64\], got 0"),
    (dict(layers=-3), r"layers must be an integer in \[1, 64\], got -3"),
    (dict(layers=2.5), r"layers must be an integer in \[1, 64\], got 2.5"),
    (dict(layers=True), r"layers must be an integer"),
    (dict(layers=4, resolution=512), r"resolution must be one of 640, 1024 \(the model's trained buckets\), got 512"),
    (dict(layers=4, use_en_prompt="yes"), r"use_en_prompt must be"),
    (dict(layers=4, image=None), r"needs image= \(the picture to split\) and layers= \(how many layers\); image is "
                                 r"missing"),
    (dict(layers=None), r"layers is missing"),
    (dict(layers=4, height=64, width=64), r"takes none of height, width \(the size follows resolution=\)"),
    (dict(layers=4, input_image="IMAGE"), r"takes none of input_image"),
    (dict(layers=4, edit_image="IMAGE"), r"takes none of edit_image"),
    (dict(layers=4, context_image="IMAGE"), r"takes none of context_image"),
    (dict(layers=4, noise=torch.zeros(1, 16, 8, 8)), r"noise must have shape \(1, 5, 16, \d+, \d+\) \(batch, layers "
                                                     r"\+ 1, 16, height/8, width/8\)"),
    (dict(layers=4, image="/no/such/file.png"), r"image: cannot read image '/no/such/file.png'"),
])  # fmt: skip
def test_bad_layered_inputs_are_one_clear_error(kwargs, message):
    kwargs = {"image": rgba(), **kwargs}
    for key in ("input_image", "edit_image", "context_image"):
        if kwargs.get(key) == "IMAGE":
            kwargs[key] = rgba().convert("RGB")
    with pytest.raises(InputError, match=message):
        build_request("", **kwargs)


def test_a_prompt_is_optional_only_for_layers():
    assert build_request(None, image=rgba(), layers=2).prompts == [""]
    with pytest.raises(InputError, match="prompt must be a string"):
        build_request(None)


def test_working_size_and_conversion():
    """The aspect ratio at resolution^2 pixels, sides multiples of 32 (diffusers' calculate_dimensions)."""
    picture = layered_input(rgba(1600, 900), 3, 1024, True)
    assert picture.image.mode == "RGBA" and picture.size == (768, 1376) and picture.frames == 4
    with pytest.warns(UserWarning, match="image is L, not RGBA; it is converted to RGBA"):
        grey = layered_input(Image.new("L", (640, 640), 128), 1, 640, False)
    assert grey.image.getpixel((0, 0)) == (128, 128, 128, 255) and grey.size == (640, 640)
    request = build_request("a cat", image=rgba(1600, 900), layers=3)
    assert (request.height, request.width) == (480, 864) and request.layered.layers == 3
    assert request.cfg_norm_rescale is False  # Layered's default (diffusers' cfg_normalize=False)
    assert build_request("a cat").cfg_norm_rescale is True


def test_frames_pack_in_order_and_back():
    latents = torch.randn(2, 3, 16, 4, 6)
    tokens = pack_frames(latents)
    assert tokens.shape == (2, 3 * 2 * 3, 64)
    from qistudio.ops.packing import patchify

    assert torch.equal(tokens[:, 6:12], patchify(latents[:, 1]))  # frame 1's tokens follow frame 0's
    assert torch.equal(unpack_frames(tokens, 3, 4, 6), latents)
    assert torch.allclose(rgba_tensor(Image.new("RGBA", (8, 8), (255, 0, 0, 0))),
                          torch.tensor([1.0, -1.0, -1.0, -1.0]).view(1, 4, 1, 1).expand(1, 4, 8, 8))


def test_composite_rebuilds_the_image_bottom_layer_first():
    background = Image.new("RGBA", (4, 4), (0, 0, 255, 255))
    sticker = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    sticker.putpixel((1, 1), (255, 0, 0, 255))
    image = composite([background, sticker])
    assert image.getpixel((1, 1)) == (255, 0, 0, 255) and image.getpixel((0, 0)) == (0, 0, 255, 255)
    assert composite_error([background, sticker], image) == 0.0
    assert composite_error([sticker, background], image) > 0  # the order matters
    half = Image.new("RGBA", (4, 4), (255, 255, 255, 128))
    assert composite_error([half], Image.new("RGB", (4, 4), (128, 128, 128))) <= 1


def test_schedule_is_the_linear_shift_of_the_input_size():
    sigmas = layered_sigmas(4, 40 * 40)  # a 640x640 input: mu = sqrt(1600 / 256) = 2.5
    grid = [1.0, 0.75, 0.5, 0.25]
    expected = [2.5 / (2.5 + (1 / t - 1)) for t in grid] + [0.0]
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(sigmas.tolist(), expected))
    assert layered_sigmas(2, 1600, mu=1.0).tolist() == [1.0, 0.5, 0.0]


def test_layers_need_the_layered_models(tiny_pipe):
    """The plain Qwen-Image DiT has neither the extra timestep row nor the layer RoPE: one message, no model run."""
    with pytest.raises(InputError, match="layers= needs Qwen-Image-Layered's DiT"):
        tiny_pipe("x", image=rgba(), layers=2, num_inference_steps=1, progress_bar_cmd=lambda x: x)


def test_the_released_layouts_are_recognised_at_full_size():
    """Qwen-Image-Layered's DiT is the base DiT's tensors plus time_text_embed.addition_t_embedding (2, 3072), its
    VAE the base VAE's with 4 image channels: both read as Layered from their shapes alone (no config.json)."""
    from conftest import checkpoint_listing
    from qistudio.models.dit import dit_config_from_shapes
    from qistudio.models.vae import VAEConfig

    shapes = {**checkpoint_listing("qwen_image_transformer"), "time_text_embed.addition_t_embedding.weight": (2, 3072)}
    config = dit_config_from_shapes(shapes)
    assert config.use_additional_t_cond and config.use_layer3d_rope and config.num_layers == 60
    assert not dit_config_from_shapes(checkpoint_listing("qwen_image_transformer")).use_layer3d_rope
    vae = checkpoint_listing("qwen_image_vae")
    rgba_vae = {**vae, "encoder.conv_in.weight": (96, 4, 3, 3, 3), "decoder.conv_out.weight": (4, 96, 3, 3, 3),
                "decoder.conv_out.bias": (4,)}
    assert VAEConfig.from_shapes(rgba_vae).image_channels == 4 and VAEConfig.from_shapes(vae).image_channels == 3


def test_a_caption_needs_the_text_encoders_head(tiny_repo, tmp_path, monkeypatch):
    """A text encoder saved without lm_head.weight (and untied) loads and encodes prompts, but cannot write a caption:
    an empty prompt is then one message saying to give a prompt."""
    import shutil

    from safetensors.torch import load_file, save_file

    import qistudio.conditioning.layered as layered
    from tiny_layered import load_layered_pipe, write_tiny_layered

    monkeypatch.setattr(layered, "RESOLUTION_AREAS", {k: v // 64 for k, v in layered.RESOLUTION_AREAS.items()})
    folder = write_tiny_layered(tmp_path / "Qwen-Image-Layered", tiny_repo)
    shutil.rmtree(folder / "text_encoder")
    (folder / "text_encoder").mkdir()
    for source in (tiny_repo / "text_encoder").iterdir():
        if source.suffix == ".safetensors":
            state = {k: v for k, v in load_file(source).items() if k != "lm_head.weight"}
            save_file(state, str(folder / "text_encoder" / source.name), metadata={"format": "pt"})
        elif source.name != "model.safetensors.index.json":
            shutil.copy(source, folder / "text_encoder" / source.name)
    pipe = load_layered_pipe(folder)
    kwargs = dict(image=rgba(), layers=1, num_inference_steps=1, cfg_scale=1.0, output_type="latent",
                  progress_bar_cmd=lambda x: x)
    assert pipe("a described picture", **kwargs).shape[1] == 2  # a prompt needs no head
    with pytest.raises(InputError, match="hold no lm_head.weight, which writing a caption for an empty prompt needs; "
                                         "give a prompt"):
        pipe("", **kwargs)


def test_the_layered_dit_is_named_in_messages():
    from qistudio.weights.formats import DIT, detect_layout

    base = ["transformer_blocks.0.img_mod.1.weight", "img_in.weight"]
    assert detect_layout(base).name == "Qwen-Image DiT (diffusers)"
    layered_keys = detect_layout([*base, "time_text_embed.addition_t_embedding.weight"])
    assert layered_keys.kind == DIT and layered_keys.name == "Qwen-Image-Layered DiT (diffusers)"
