"""Qwen-Image-Layered parity: diffusers' QwenImageLayeredPipeline and ours (image=, layers=), same weights and noise.

The tiny repository is written by diffusers' classes (a Layered transformer with addition_t_embedding and the
layer-3D RoPE, a 4-channel VAE) and loaded by our loaders, which recognise both from their tensors. Both libraries'
working areas are scaled down by the same factor, which changes no code path.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import qistudio.conditioning.layered as layered
from conftest import rel_err
from qistudio.conditioning.layered import pack_frames
from tiny_layered import load_layered_pipe, reference_layered, write_tiny_layered

SCALE = 64  # 640x640 -> 80x80 pixels of working area
QUIET = dict(progress_bar_cmd=lambda x: x)


@pytest.fixture(autouse=True)
def small_working_area(monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_layered as d_layered

    original = d_layered.calculate_dimensions
    monkeypatch.setattr(d_layered, "calculate_dimensions", lambda area, ratio, f=original: f(area // SCALE, ratio))
    monkeypatch.setattr(layered, "RESOLUTION_AREAS", {k: v // SCALE for k, v in layered.RESOLUTION_AREAS.items()})


@pytest.fixture(scope="module")
def layered_repo(tiny_repo, tmp_path_factory):
    return write_tiny_layered(tmp_path_factory.mktemp("Qwen-Image-Layered"), tiny_repo)


@pytest.fixture(scope="module")
def pipe(layered_repo):
    return load_layered_pipe(layered_repo)


@pytest.fixture(scope="module")
def ref(layered_repo):
    return reference_layered(layered_repo)


def rgba_image(width, height, seed=0) -> Image.Image:
    """Random colours with a random, partly transparent alpha channel."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")


def reference_latents(ref, **kwargs) -> torch.Tensor:
    """diffusers' final packed latents (B, F N, 64). Its output_type="latent" raises (0.42.1 returns an unset name),
    so they are taken from the step callback, and the images it decodes are dropped."""
    seen = {}

    def keep(pipeline, step, timestep, tensors):
        seen["latents"] = tensors["latents"]
        return {}

    with torch.no_grad():
        ref(**kwargs, output_type="pt", callback_on_step_end=keep)
    return seen["latents"]


def noise_for(layers, height, width, batch=1, seed=7):
    return torch.randn(batch, layers + 1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def test_models_are_recognised_from_their_tensors(pipe):
    assert pipe.dit.config.use_additional_t_cond and pipe.dit.config.use_layer3d_rope
    assert tuple(pipe.dit.time_text_embed.addition_t_embedding.weight.shape) == (2, pipe.dit.config.dim)
    assert pipe.vae.config.image_channels == 4


@pytest.mark.parametrize("guidance, normalize", [(False, False), (True, False), (True, True)])
def test_layers_match_diffusers(pipe, ref, guidance, normalize):
    image, layers = rgba_image(96, 64, seed=1), 2
    height, width = 64, 96  # the (scaled) 640 bucket at this aspect ratio, in both libraries
    noise = noise_for(layers, height, width)
    prompt, negative = "a poster: a red cat under the word HELLO", "blurry"
    expected = reference_latents(ref, image=image, prompt=prompt, negative_prompt=negative if guidance else None,
                                 true_cfg_scale=4.0, layers=layers, resolution=640, num_inference_steps=3,
                                 latents=pack_frames(noise), cfg_normalize=normalize)
    got = pipe(prompt, image=image, layers=layers, resolution=640, negative_prompt=negative if guidance else None,
               cfg_scale=4.0 if guidance else 1.0, cfg_norm_rescale=normalize if normalize else None,
               num_inference_steps=3, noise=noise, output_type="latent", **QUIET)
    assert got.shape == noise.shape
    assert rel_err(pack_frames(got), expected) <= 1e-4


def test_decoded_layers_match_diffusers(pipe, ref):
    """The RGBA images: the composite frame dropped, every layer decoded (clamped, rounded to 8 bits)."""
    image, layers = rgba_image(64, 64, seed=2).convert("RGB"), 3  # an RGB input: converted with a warning
    noise = noise_for(layers, 64, 64, seed=3)
    with torch.no_grad():
        expected = ref(image=image.convert("RGBA"), prompt="shapes", layers=layers, num_inference_steps=2,
                       latents=pack_frames(noise)).images[0]
    with pytest.warns(UserWarning, match="image is RGB, not RGBA; it is converted to RGBA"):
        got = pipe("shapes", image=image, layers=layers, cfg_scale=1.0, num_inference_steps=2, noise=noise, **QUIET)
    assert len(got) == layers and all(layer.mode == "RGBA" and layer.size == (64, 64) for layer in got)
    for ours, theirs in zip(got, expected):
        difference = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
        assert difference.max() <= 1  # rounding at the last bit only


def test_empty_prompt_is_captioned_as_diffusers_does(pipe, ref, monkeypatch):
    """An empty prompt: the text encoder writes a caption of the image (English here), then layers as usual.

    Both libraries generate at most 512 new tokens; a random model rarely stops early, so both are held to 24 here
    (the same code path, a shorter caption)."""
    import qistudio.conditioning.caption as caption_module

    generate = ref.text_encoder.generate
    monkeypatch.setattr(caption_module, "MAX_NEW_TOKENS", 24)
    monkeypatch.setattr(ref.text_encoder, "generate", lambda **inputs: generate(**{**inputs, "max_new_tokens": 24}))
    image, layers = rgba_image(64, 96, seed=4), 1
    noise = noise_for(layers, 96, 64, seed=5)
    with torch.no_grad():
        resized = ref.image_processor.resize(image, 96, 64)
        caption = ref.get_image_caption(resized, use_en_prompt=True, device="cpu")
    expected = reference_latents(ref, image=image, prompt="", layers=layers, num_inference_steps=2,
                                 use_en_prompt=True, latents=pack_frames(noise))
    got = pipe(image=image, layers=layers, use_en_prompt=True, cfg_scale=1.0, num_inference_steps=2, noise=noise,
               output_type="latent", **QUIET)
    assert pipe.last_request.extras["caption"] == caption
    assert rel_err(pack_frames(got), expected) <= 1e-4


def test_batched_and_separate_guidance_agree(pipe):
    image = rgba_image(64, 64, seed=6)
    kwargs = dict(image=image, layers=2, negative_prompt="", num_inference_steps=2, output_type="latent",
                  noise=noise_for(2, 64, 64, batch=2), num_images=2, **QUIET)
    both = pipe("a stack of layers", **kwargs)
    separate = pipe("a stack of layers", cfg_batch=False, **kwargs)
    assert rel_err(both, separate) <= 1e-5
    alone = pipe("a stack of layers", **{**kwargs, "num_images": 1, "noise": kwargs["noise"][1:]})
    assert rel_err(both[1:], alone) <= 1e-5
