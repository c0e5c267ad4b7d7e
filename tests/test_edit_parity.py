"""Edit parity: diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline and ours, same weights, same noise.

The Edit models work at about 1024x1024 (latents) and 384x384 (vision copies). A tiny model does not need that
much: both libraries' working areas are scaled down by the same factor (64), which changes no code path.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import qistudio.conditioning.edit as edit
from conftest import rel_err
from qistudio import ModelConfig, QwenImagePipeline
from qistudio.ops.packing import patchify, unpatchify
from tiny_models import reference_dit, reference_pipeline, save

SCALE = 64
QUIET = dict(progress_bar_cmd=lambda x: x, output_type="latent")


@pytest.fixture(autouse=True)
def small_working_area(monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as d_edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as d_plus

    for module in (d_edit, d_plus):
        original = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio, f=original: f(area // SCALE, ratio))
    monkeypatch.setattr(edit, "EDIT_LATENT_AREA", edit.EDIT_LATENT_AREA // SCALE)
    monkeypatch.setattr(edit, "EDIT_VISION_AREA", edit.EDIT_VISION_AREA // SCALE)


def random_image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def load_edit_pipe(tiny_repo, transformer=None):
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32,
        device="cpu",
        model_configs=[
            ModelConfig(path=str(transformer or tiny_repo / "transformer")),
            ModelConfig(path=str(tiny_repo / "text_encoder")),
            ModelConfig(path=str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors")),
        ],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
        processor_config=ModelConfig(path=str(tiny_repo / "processor")),
    )


@pytest.fixture(scope="module")
def edit_pipe(tiny_repo):
    return load_edit_pipe(tiny_repo)


def _noise(height, width, batch=1, seed=7):
    return torch.randn(batch, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def test_single_image_edit_matches_diffusers(tiny_repo, edit_pipe):
    ref = reference_pipeline(tiny_repo, "edit")
    image = random_image(96, 64)
    width, height = edit.size_at_area(edit.EDIT_LATENT_AREA, 96 / 64)  # the output size rule of both libraries
    noise = _noise(height, width)
    with torch.no_grad():
        expected = ref(image=image, prompt="make the sky purple", negative_prompt="blurry", true_cfg_scale=4.0,
                       num_inference_steps=3, latents=patchify(noise), output_type="latent").images
    got = edit_pipe("make the sky purple", edit_image=image, negative_prompt="blurry", cfg_scale=4.0,
                    num_inference_steps=3, noise=noise, **QUIET)
    assert got.shape == noise.shape  # no size given: the edit image's aspect at the working area
    assert rel_err(got, unpatchify(expected, height // 16, width // 16)) <= 1e-4


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_multi_image_edit_matches_diffusers_plus(tiny_repo, tmp_path_factory, edit_pipe, zero_cond_t):
    """Edit-2509 (a list of images) and Edit-2511 (zero_cond_t, read from the transformer's config.json)."""
    transformer = None
    pipe = edit_pipe
    if zero_cond_t:
        folder = save(reference_dit(zero_cond_t=True), tmp_path_factory.mktemp("Edit-2511") / "transformer")
        transformer = reference_dit(zero_cond_t=True)
        pipe = load_edit_pipe(tiny_repo, transformer=folder)
        assert pipe.dit.config.zero_cond_t
    ref = reference_pipeline(tiny_repo, "edit_plus", transformer=transformer)
    images = [random_image(96, 64, seed=1), random_image(48, 80, seed=2)]
    width, height = edit.size_at_area(edit.EDIT_LATENT_AREA, 48 / 80)  # the last image sets the output
    noise = _noise(height, width)
    prompt = "put the cat from picture 1 into picture 2"
    with torch.no_grad():
        expected = ref(image=images, prompt=prompt, negative_prompt=" ", true_cfg_scale=2.5, num_inference_steps=3,
                       latents=patchify(noise), output_type="latent").images
    got = pipe(prompt, edit_image=images, negative_prompt=" ", cfg_scale=2.5, num_inference_steps=3, noise=noise, **QUIET)
    assert rel_err(got, unpatchify(expected, height // 16, width // 16)) <= 1e-4


def test_batched_edits_equal_each_edit_alone(edit_pipe):
    """Rows with different images (different token counts, different text lengths) are padded and masked."""
    prompts = ["make it snow", "turn the second picture into a watercolour painting of a harbour at night"]
    edit_images = [random_image(64, 64, seed=3), [random_image(96, 64, seed=4), random_image(64, 96, seed=5)]]
    noise = _noise(64, 80, batch=2)
    kwargs = dict(height=64, width=80, num_inference_steps=2, negative_prompt="low quality", cfg_scale=3.0, **QUIET)
    together = edit_pipe(prompts, edit_image=edit_images, noise=noise, **kwargs)
    for i in range(2):
        alone = edit_pipe(prompts[i], edit_image=edit_images[i], noise=noise[i : i + 1], **kwargs)
        assert rel_err(together[i : i + 1], alone) <= 1e-5
    separate = edit_pipe(prompts, edit_image=edit_images, noise=noise, cfg_batch=False, **kwargs)
    assert rel_err(together, separate) <= 1e-5


def test_num_images_share_the_edit_conditioning(edit_pipe):
    image = random_image(64, 64, seed=6)
    noise = _noise(128, 128, batch=2)  # a square edit image at the (scaled) working area
    kwargs = dict(num_inference_steps=2, cfg_scale=1.0, **QUIET)
    pair = edit_pipe("add a hat", edit_image=image, num_images=2, noise=noise, **kwargs)
    second = edit_pipe("add a hat", edit_image=image, noise=noise[1:], **kwargs)
    assert rel_err(pair[1:], second) <= 1e-5
