"""Edit inpainting: diffusers' QwenImageEditInpaintPipeline and ours (edit_image + inpaint_mask), same weights and
noise; the inputs it refuses; and the property that makes it inpainting (the unmasked latents are the image's).

The working area is scaled down by 64 in both libraries, as in test_edit_parity.py.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import qistudio.conditioning.edit as edit
from conftest import rel_err
from qistudio.ops.packing import unpatchify
from qistudio.validation import InputError
from test_edit_parity import SCALE, load_edit_pipe, random_image
from tiny_models import read_only_part

QUIET = dict(progress_bar_cmd=lambda x: x, output_type="latent")


@pytest.fixture(autouse=True)
def small_working_area(monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_inpaint as d_inpaint

    original = d_inpaint.calculate_dimensions
    monkeypatch.setattr(d_inpaint, "calculate_dimensions", lambda area, ratio, f=original: f(area // SCALE, ratio))
    monkeypatch.setattr(edit, "EDIT_LATENT_AREA", edit.EDIT_LATENT_AREA // SCALE)
    monkeypatch.setattr(edit, "EDIT_VISION_AREA", edit.EDIT_VISION_AREA // SCALE)


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return load_edit_pipe(tiny_repo)


def reference(folder):
    """diffusers' Edit inpainting pipeline over the tiny repository, its VAE posterior made (nearly) deterministic:
    it samples the posterior where we take its mean."""
    import diffusers
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    vae = diffusers.AutoencoderKLQwenImage.from_pretrained(folder / "vae").eval()
    with torch.no_grad():
        vae.quant_conv.bias[16:] = -60.0  # log-variance: std e^-15 (after the reference's clamp at -30)
    return diffusers.QwenImageEditInpaintPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=vae,
        text_encoder=read_only_part(folder, "text_encoder",
                                    lambda path: Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()),
        tokenizer=read_only_part(folder, "tokenizer", AutoTokenizer.from_pretrained),
        processor=read_only_part(folder, "processor", AutoProcessor.from_pretrained),
        transformer=diffusers.QwenImageTransformer2DModel.from_pretrained(folder / "transformer").eval(),
    )


def rectangle_mask(width, height, box) -> Image.Image:
    """White (repaint) inside `box` = (left, top, right, bottom), black elsewhere; RGB, as a user's mask file."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = 255
    return Image.fromarray(pixels)


def replayed_noise(seed, height, width):
    """diffusers draws from one generator: the posterior sample, then the noise. Replay both draws."""
    generator = torch.Generator().manual_seed(seed)
    torch.randn((1, 16, 1, height // 8, width // 8), generator=generator)
    return torch.randn((1, 1, 16, height // 8, width // 8), generator=generator)[:, 0]


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_edit_inpainting_matches_diffusers(tiny_repo, pipe, strength):
    ref = reference(tiny_repo)
    image = random_image(96, 64, seed=11)
    width, height = edit.size_at_area(edit.EDIT_LATENT_AREA, 96 / 64)  # both libraries' working size
    mask = rectangle_mask(96, 64, (20, 10, 70, 50))  # at the image's size: both resize it to the working size
    steps, prompt = 4, "a red balloon"
    with torch.no_grad():
        expected = ref(image=image, mask_image=mask, prompt=prompt, negative_prompt="blurry", true_cfg_scale=4.0,
                       strength=strength, num_inference_steps=steps, generator=torch.Generator().manual_seed(7),
                       output_type="latent").images
    kwargs = {}
    if strength < 1:
        # diffusers' strength skips the first steps of the full schedule (get_timesteps); pass what it ran.
        kwargs["sigmas"] = ref.scheduler.sigmas[int(steps - steps * strength):].tolist()
    got = pipe(prompt, edit_image=image, inpaint_mask=mask, negative_prompt="blurry", cfg_scale=4.0,
               denoising_strength=strength, num_inference_steps=steps, noise=replayed_noise(7, height, width),
               **kwargs, **QUIET)
    assert got.shape == (1, 16, height // 8, width // 8)
    assert rel_err(got, unpatchify(expected, height // 16, width // 16)) <= 1e-4


def test_the_unmasked_region_is_the_edit_image(pipe):
    """Outside the mask the result is the edited image's latents (to float rounding); inside it is repainted."""
    image = random_image(64, 64, seed=12)
    width, height = edit.size_at_area(edit.EDIT_LATENT_AREA, 1.0)
    mask = rectangle_mask(64, 64, (0, 0, 32, 64))  # the left half
    got = pipe("make it night", edit_image=image, inpaint_mask=mask, num_inference_steps=3, cfg_scale=1.0, seed=3,
               **QUIET)
    latents = pipe.vae.encode(
        torch.from_numpy(np.asarray(image.resize((width, height), Image.LANCZOS), dtype=np.float32))
        .permute(2, 0, 1)[None] / 127.5 - 1)
    half = got.shape[-1] // 2
    assert rel_err(got[..., half:], latents[..., half:]) <= 1e-6
    assert rel_err(got[..., :half], latents[..., :half]) > 0.1


def test_num_images_and_batched_guidance_agree(pipe):
    image, mask = random_image(64, 96, seed=13), rectangle_mask(64, 96, (8, 8, 40, 60))
    kwargs = dict(edit_image=image, inpaint_mask=mask, num_inference_steps=2, negative_prompt="", **QUIET)
    both = pipe("a hat", num_images=2, seed=4, **kwargs)
    separate = pipe("a hat", num_images=2, seed=4, cfg_batch=False, **kwargs)
    assert both.shape[0] == 2 and rel_err(both, separate) <= 1e-5


def test_refusals_name_the_problem(pipe):
    image, mask = random_image(96, 64), rectangle_mask(96, 64, (0, 0, 10, 10))
    with pytest.raises(InputError, match=r"edit inpainting makes the edit image's working size 160x96; got "
                                         r"height=64, width=64 \(leave them unset\)"):
        pipe("x", edit_image=image, inpaint_mask=mask, height=64, width=64, **QUIET)
    with pytest.raises(InputError, match="inpaint_mask needs input_image .* or edit_image"):
        pipe("x", inpaint_mask=mask, **QUIET)
    with pytest.raises(InputError, match="denoising_strength=0.5 needs input_image"):
        pipe("x", denoising_strength=0.5, **QUIET)
    with pytest.raises(InputError, match="different working sizes"):
        pipe(["x", "y"], edit_image=[image, random_image(64, 96)], inpaint_mask=mask, **QUIET)
