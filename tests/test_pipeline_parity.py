"""Pipeline parity: diffusers' QwenImagePipeline / QwenImageImg2ImgPipeline and ours, same weights, same noise."""

import numpy as np
import pytest
import torch

from conftest import rel_err
from qistudio.ops.packing import patchify, unpatchify
from tiny_models import reference_pipeline

H, W = 64, 96  # non-square: latent 8x12, patch grid 4x6


def _noise(batch=1):
    return torch.randn(batch, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def ref_pipe(tiny_repo):
    return reference_pipeline(tiny_repo)


@pytest.mark.parametrize("guidance", [True, False])
def test_text_to_image_latents_match_diffusers(tiny_pipe, ref_pipe, guidance):
    prompt, negative = "a red fox in the snow, watercolour", "blurry, low quality, extra fingers on the hand"
    noise = _noise()
    with torch.no_grad():
        expected = ref_pipe(
            prompt=prompt, negative_prompt=negative if guidance else None, true_cfg_scale=4.0 if guidance else 1.0,
            height=H, width=W, num_inference_steps=4, latents=patchify(noise), output_type="latent",
        ).images
    got = tiny_pipe(
        prompt, negative_prompt=negative, cfg_scale=4.0 if guidance else 1.0, height=H, width=W,
        num_inference_steps=4, noise=noise, cfg_norm_rescale=True, output_type="latent", progress_bar_cmd=lambda x: x,
    )
    assert rel_err(got, unpatchify(expected, H // 16, W // 16)) <= 1e-4


def test_batched_and_separate_guidance_agree(tiny_pipe):
    noise = _noise()
    kwargs = dict(negative_prompt="", height=H, width=W, num_inference_steps=3, noise=noise, output_type="latent",
                  progress_bar_cmd=lambda x: x)
    batched = tiny_pipe("a lighthouse at dusk", cfg_batch=True, **kwargs)
    separate = tiny_pipe("a lighthouse at dusk", cfg_batch=False, **kwargs)
    assert rel_err(batched, separate) <= 1e-5


def test_several_prompts_equal_each_prompt_alone(tiny_pipe):
    prompts = ["a cat", "a very long prompt about a castle on a hill under a stormy purple sky"]
    noise = _noise(2)
    kwargs = dict(height=H, width=W, num_inference_steps=2, output_type="latent", progress_bar_cmd=lambda x: x)
    together = tiny_pipe(prompts, noise=noise, **kwargs)
    for i, prompt in enumerate(prompts):
        alone = tiny_pipe(prompt, noise=noise[i : i + 1], **kwargs)
        assert rel_err(together[i : i + 1], alone) <= 1e-5


def test_image_to_image_matches_diffusers_with_its_sigmas(tiny_repo, tiny_pipe):
    from PIL import Image

    ref = reference_pipeline(tiny_repo, "img2img")
    # diffusers samples the VAE posterior; make it deterministic (tiny variance) so both use the mean.
    with torch.no_grad():
        ref.vae.quant_conv.bias[16:] = -60.0
        tiny_pipe.vae.quant_conv.bias[16:] = -60.0
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8))
    steps, strength = 4, 0.6
    # diffusers draws from one generator: first the posterior sample, then the noise. Replay both draws.
    generator = torch.Generator().manual_seed(7)
    torch.randn((1, 16, 1, H // 8, W // 8), generator=generator)
    noise = torch.randn((1, 1, 16, H // 8, W // 8), generator=generator)[:, 0]
    with torch.no_grad():
        expected = ref(
            prompt="a boat", negative_prompt="ugly", true_cfg_scale=3.0, image=image, strength=strength, height=H,
            width=W, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type="latent",
        ).images
    # diffusers' strength skips the first steps of the full schedule (get_timesteps); pass what it ran.
    t_start = int(max(steps - steps * strength, 0))
    ran = ref.scheduler.sigmas[t_start:].tolist()
    got = tiny_pipe(
        "a boat", negative_prompt="ugly", cfg_scale=3.0, input_image=image, denoising_strength=strength, height=H,
        width=W, sigmas=ran, noise=noise, output_type="latent", progress_bar_cmd=lambda x: x,
    )
    assert rel_err(got, unpatchify(expected, H // 16, W // 16)) <= 1e-4
