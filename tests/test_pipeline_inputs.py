"""Pipeline inputs: errors before any model runs, size rounding, truncation, seeds, callbacks."""

import pytest
import torch
from PIL import Image

from conftest import rel_err

FAST = dict(height=32, width=48, num_inference_steps=2, progress_bar_cmd=lambda x: x)


@pytest.fixture
def no_model_runs(tiny_pipe, monkeypatch):
    """Fail loudly if any model is called."""
    def boom(*args, **kwargs):
        raise AssertionError("a model ran before the input was checked")

    for model in (tiny_pipe.dit, tiny_pipe.vae, tiny_pipe.text_encoder):
        monkeypatch.setattr(model, "forward", boom)
    return tiny_pipe


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(denoising_strength=0.0), r"denoising_strength must be in \(0, 1\], got 0.0"),
        (dict(denoising_strength=1.5), r"denoising_strength must be in \(0, 1\], got 1.5"),
        (dict(denoising_strength=0.5), "needs input_image"),
        (dict(num_inference_steps=0), r"num_inference_steps must be an integer in \[1, 10000\], got 0"),
        (dict(input_image="/no/such/image.png", denoising_strength=0.5), "cannot read image '/no/such/image.png'"),
        (dict(noise=torch.zeros(1, 16, 3, 3)), r"noise must have shape \(1, 16, 4, 6\)"),
    ],
)
def test_bad_input_fails_before_any_model_runs(no_model_runs, kwargs, message):
    args = {**FAST, **kwargs}
    with pytest.raises(ValueError, match=message):
        no_model_runs("a cat", **args)


def test_unreadable_image_file(no_model_runs, tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        no_model_runs("a cat", input_image=str(path), denoising_strength=0.5, **FAST)


def test_size_rounded_up_to_16_with_a_warning(tiny_pipe):
    with pytest.warns(UserWarning, match="size 40x20 is not a multiple of 16; using 48x32"):
        image = tiny_pipe("a cat", height=20, width=40, num_inference_steps=1, progress_bar_cmd=lambda x: x)
    assert image.size == (48, 32)


def test_long_prompt_truncated_with_a_warning(tiny_pipe):
    prompt = " ".join(["castle"] * 1100)
    with pytest.warns(UserWarning, match="truncated to 1024 tokens"):
        tiny_pipe(prompt, cfg_scale=1.0, output_type="latent", **FAST)


def test_seed_reproduces_and_is_reported(tiny_pipe):
    a = tiny_pipe("a cat", seed=3, output_type="latent", **FAST)
    b = tiny_pipe("a cat", seed=3, output_type="latent", **FAST)
    assert torch.equal(a, b)
    tiny_pipe("a cat", output_type="latent", **FAST)
    assert isinstance(tiny_pipe.last_seed, int)
    # The first image of a batch drawn from a seed is that seed's single image.
    both = tiny_pipe("a cat", seed=3, num_images=2, output_type="latent", **FAST)
    assert both.shape[0] == 2 and rel_err(both[:1], a) <= 1e-5


def test_callback_sees_every_step(tiny_pipe):
    seen = []
    tiny_pipe("a cat", callback=lambda i, sigma, x: seen.append((i, round(sigma, 4))), **FAST)
    assert [i for i, _ in seen] == [0, 1] and seen[0][1] == 1.0


def test_plain_guidance_differs_from_norm_preserving(tiny_pipe):
    kwargs = dict(seed=1, output_type="latent", negative_prompt="blurry", **FAST)
    plain = tiny_pipe("a cat", cfg_norm_rescale=False, **kwargs)
    rescaled = tiny_pipe("a cat", cfg_norm_rescale=True, **kwargs)
    assert rel_err(plain, rescaled) > 1e-3


def test_image_to_image_accepts_any_input_size(tiny_pipe):
    image = Image.new("RGB", (100, 37), (200, 30, 30))
    out = tiny_pipe("a cat", input_image=image, denoising_strength=0.5, **FAST)
    assert out.size == (48, 32)


def test_one_step_schedule_is_finite(tiny_pipe):
    """With one step the terminal stretch would divide 0 by 0 (the references sample NaN); we skip it."""
    from qistudio.sampling.schedule import flow_sigmas

    assert flow_sigmas(1, 4096).tolist() == [1.0, 0.0]
    latents = tiny_pipe("a cat", height=32, width=32, num_inference_steps=1, output_type="latent",
                        progress_bar_cmd=lambda x: x)
    assert torch.isfinite(latents).all()


def test_transparent_inpaint_mask_reads_as_its_opaque_form(tiny_pipe):
    """A white region drawn on a transparent canvas is that region, not the whole picture (alpha is dropped)."""
    source = Image.new("RGB", (48, 32), (120, 80, 40))
    opaque = Image.new("RGB", (48, 32), (0, 0, 0))
    opaque.paste((255, 255, 255), (0, 0, 16, 16))
    transparent = Image.new("RGBA", (48, 32), (0, 0, 0, 0))
    transparent.paste((255, 255, 255, 255), (0, 0, 16, 16))
    args = dict(FAST, input_image=source, denoising_strength=1.0, seed=3, output_type="latent")
    from_opaque = tiny_pipe("a cat", inpaint_mask=opaque, **args)
    from_transparent = tiny_pipe("a cat", inpaint_mask=transparent, **args)
    assert torch.equal(from_opaque, from_transparent)
