"""Qwen-Image 2.1 through the seed's front door against diffusers 0.42.1's QwenImage21Pipeline on the same tiny
random weights (written by the reference classes): final latents with and without the KV cache, text-to-image and
editing with one and several images, with guidance; the decoded RGBA images; the size rule and input refusals."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import rel_err
from qistudio import ModelConfig, QwenImagePipeline
from qistudio.validation import InputError
from tiny_qwen21 import LATENT_CHANNELS, model_configs21, reference_pipeline21, tiny_repository21

TOLERANCE = 1e-4
QUIET = dict(progress_bar_cmd=lambda steps: steps)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return tiny_repository21(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(repo):
    return QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=model_configs21(repo),
                                             tokenizer_config=None,
                                             processor_config=ModelConfig(path=str(repo / "processor")))


@pytest.fixture(scope="module")
def ref(repo):
    return reference_pipeline21(repo)


def _noise(height: int, width: int, seed: int = 7, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, LATENT_CHANNELS, height, width, generator=torch.Generator().manual_seed(seed))


def _packed(noise: torch.Tensor) -> torch.Tensor:
    return noise.flatten(2).transpose(1, 2)  # diffusers' (B, h*w, C) latents


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (70, 40, 4), dtype=np.uint8), "RGBA"),  # RGBA, alpha varies
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))]


def test_from_pretrained_gives_the_21_pipeline(pipe):
    from qistudio.pipeline21 import QwenImage21Pipeline

    assert isinstance(pipe, QwenImage21Pipeline) and isinstance(pipe, QwenImagePipeline)


@pytest.mark.parametrize("use_kv_cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("guidance", [False, True], ids=["no-guidance", "guidance"])
def test_text_to_image_matches_diffusers(pipe, ref, use_kv_cache, guidance):
    noise = _noise(4, 6)
    negative = dict(negative_prompt="blurry, low quality") if guidance else {}
    with torch.no_grad():
        expected = ref(prompt="a red fox in the snow", height=64, width=96, num_inference_steps=3,
                       latents=_packed(noise), output_type="latent", use_kv_cache=use_kv_cache,
                       true_cfg_scale=3.5 if guidance else 1.0, **negative).images
    got = pipe("a red fox in the snow", height=64, width=96, num_inference_steps=3, noise=noise, output_type="latent",
               use_kv_cache=use_kv_cache, cfg_scale=3.5 if guidance else 1.0, **negative, **QUIET)
    assert rel_err(_packed(got), expected) <= TOLERANCE


@pytest.mark.parametrize("use_kv_cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("count", [1, 3])
def test_editing_matches_diffusers(pipe, ref, count, use_kv_cache):
    images = _images()[:count]
    # The output takes the last image's aspect at 64^2 pixels: 96x64 for one image, 64x64 for three.
    latent_size = (4, 6) if count == 1 else (4, 4)
    noise = _noise(*latent_size, seed=count)
    with torch.no_grad():
        expected = ref(prompt="make the sky orange", image=images, output_resolution=64, num_inference_steps=3,
                       latents=_packed(noise), output_type="latent", negative_prompt="ugly", true_cfg_scale=3.0,
                       use_kv_cache=use_kv_cache).images
    got = pipe("make the sky orange", edit_image=images, output_resolution=64, num_inference_steps=3, noise=noise,
               negative_prompt="ugly", cfg_scale=3.0, output_type="latent", use_kv_cache=use_kv_cache, **QUIET)
    assert got.shape[2:] == latent_size
    assert rel_err(_packed(got), expected) <= TOLERANCE


def test_kv_cache_changes_nothing_and_prefills_once(pipe, monkeypatch):
    dit, calls = pipe.dit, []
    prefill = dit.prefill
    monkeypatch.setattr(dit, "prefill", lambda *args: calls.append(1) or prefill(*args))
    kwargs = dict(edit_image=_images()[:2], output_resolution=64, num_inference_steps=4, noise=_noise(6, 4, seed=2),
                  negative_prompt="", cfg_scale=2.0, output_type="latent", **QUIET)
    cached = pipe("a cat", use_kv_cache=True, **kwargs)
    assert len(calls) == 2  # the prompt's prefix and the negative prompt's, once each
    uncached = pipe("a cat", use_kv_cache=False, **kwargs)
    assert len(calls) == 2 + 2 * 4  # both again at every step
    assert torch.equal(cached, uncached)


def test_decoded_rgba_images_match_diffusers(pipe, ref):
    images = _images()[1:2]  # an RGBA edit image
    noise = _noise(6, 4, seed=5)
    with torch.no_grad():
        expected = ref(prompt="a glass vase", image=images, output_resolution=64, num_inference_steps=2,
                       latents=_packed(noise)).images[0]
    got = pipe("a glass vase", edit_image=images, output_resolution=64, num_inference_steps=2, noise=noise, **QUIET)
    assert got.mode == expected.mode == "RGBA" and got.size == expected.size == (64, 96)
    difference = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1


def test_images_of_a_prompt_and_prompts_of_a_call_are_independent(pipe):
    noise = _noise(2, 2, batch=4)
    kwargs = dict(height=32, width=32, num_inference_steps=2, output_type="latent", **QUIET)
    together = pipe(["a cat", "a much longer prompt about a castle"], num_images=2, noise=noise, **kwargs)
    for k, prompt in enumerate(["a cat", "a much longer prompt about a castle"]):
        for row in (2 * k, 2 * k + 1):
            alone = pipe(prompt, noise=noise[row:row + 1], **kwargs)
            assert rel_err(together[row:row + 1], alone) <= 1e-5


def test_output_size_rule():
    from qistudio.request21 import build_request21

    wide = Image.new("RGB", (300, 100))
    assert (build_request21("x").height, build_request21("x").width) == (1024, 1024)
    request = build_request21("x", edit_image=[Image.new("RGB", (100, 300)), wide])  # the last image's aspect
    assert (request.height, request.width) == (576, 1760)
    assert [im.size for im in request.edit_images] == [(576, 1760), (1760, 576)]
    assert all(im.mode == "RGBA" for im in request.edit_images)
    assert (build_request21("x", edit_image=wide, height=512).height, build_request21("x", edit_image=wide,
                                                                                      height=512).width) == (512, 1760)
    with pytest.warns(UserWarning, match="floored to 96x64"):
        request = build_request21("x", height=100, width=70)
    assert (request.height, request.width) == (96, 64)


@pytest.mark.parametrize("arguments, message", [
    (dict(edit_image=[Image.new("RGB", (64, 64))] * 11), "1 to 10 images"),
    (dict(edit_image=[[Image.new("RGB", (64, 64))]]), "one flat list"),
    (dict(height=16, width=64), "height must be at least 32"),
    (dict(output_resolution=0), "output_resolution must be an integer"),
    (dict(use_kv_cache=1), "use_kv_cache must be True or False"),
    (dict(output_type="np"), "output_type must be"),
    (dict(height=64, width=64, noise=torch.zeros(1, 16, 3, 4)), r"noise must have shape \(1, latent channels, 4, 4\)"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(tile_size=4, tile_stride=8), "tile_stride"),
])
def test_input_errors_are_named_before_any_model_runs(pipe, arguments, message):
    with pytest.raises(InputError, match=message):
        pipe("a cat", **arguments, **QUIET)


def test_a_qwen25_processor_is_refused(pipe, tmp_path):
    from transformers import AutoProcessor

    from qistudio.tokenizer_build import write_qwen25_processor

    loaded, pipe.components.processor = pipe.components.processor, AutoProcessor.from_pretrained(
        write_qwen25_processor(tmp_path))
    try:
        with pytest.raises(InputError, match="14-pixel patches"):
            pipe("a cat", height=32, width=32, num_inference_steps=1, **QUIET)
    finally:
        pipe.components.processor = loaded


def test_without_a_processor_one_is_built_from_the_tokenizer(repo, pipe):
    built = QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                              model_configs=model_configs21(repo),
                                              tokenizer_config=ModelConfig(path=str(repo / "processor")))
    kwargs = dict(height=32, width=64, num_inference_steps=2, seed=3, output_type="latent", **QUIET)
    with pytest.warns(UserWarning, match="no processor_config"):
        got = built("a lighthouse", **kwargs)
    assert built.components.processor.image_processor.patch_size == 16
    assert torch.equal(got, pipe("a lighthouse", **kwargs))
