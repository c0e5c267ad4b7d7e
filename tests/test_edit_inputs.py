"""Edit inputs: how edit images are paired with prompts, sized, positioned (Lowres-Fix), and refused."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import qistudio.conditioning.edit as edit
from conftest import rel_err
from qistudio.conditioning.sequence import build_sequence
from qistudio.models.text_encoder import TextStates
from qistudio.ops.rope import ImageGrid, image_positions, rope_tables
from qistudio.request import build_request, edit_rows_from

QUIET = dict(progress_bar_cmd=lambda x: x, output_type="latent")


def random_image(width, height, seed=0, mode="RGB"):
    channels = len(mode)
    array = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array, mode=mode)


@pytest.fixture(autouse=True)
def small_working_area(monkeypatch):
    monkeypatch.setattr(edit, "EDIT_LATENT_AREA", 128 * 128)
    monkeypatch.setattr(edit, "EDIT_VISION_AREA", 48 * 48)


def test_pairing_rules():
    a, b, c = random_image(32, 32), random_image(48, 32), random_image(32, 48)
    single = edit_rows_from(a, 2)  # one image for every prompt, original Edit template
    assert [(len(r.images), r.multi) for r in single] == [(1, False), (1, False)]
    assert [(len(r.images), r.multi) for r in edit_rows_from([a, b], 1)] == [(2, True)]  # Edit-2509 list
    per_prompt = edit_rows_from([a, [b, c]], 2)
    assert [(len(r.images), r.multi) for r in per_prompt] == [(1, False), (2, True)]
    assert [(len(r.images), r.multi) for r in edit_rows_from([[a, b]], 1)] == [(2, True)]
    with pytest.raises(ValueError, match="edit_image has 3 entries for 2 prompt"):
        edit_rows_from([a, b, c], 2)
    with pytest.raises(ValueError, match="entry 0 is an empty list"):
        edit_rows_from([[], [a]], 2)


def test_output_size_follows_the_last_edit_image():
    request = build_request("x", edit_image=[random_image(32, 32), random_image(96, 64)])
    assert (request.width, request.height) == edit.size_at_area(128 * 128, 1.5) == (160, 96)
    assert (build_request("x").height, build_request("x").width) == (1328, 1328)  # no edit image: the default
    given = build_request("x", edit_image=random_image(96, 64), height=64, width=64)
    assert (given.height, given.width) == (64, 64)
    with pytest.raises(ValueError, match="different output sizes .* pass height= and width="):
        build_request(["x", "y"], edit_image=[random_image(32, 32), random_image(96, 64)])
    with pytest.raises(ValueError, match="give both height and width"):
        build_request("x", edit_image=random_image(32, 32), height=64)


def test_unreadable_zero_sized_and_transparent_images(tmp_path):
    with pytest.raises(ValueError, match="cannot read image .*missing.png"):
        build_request("x", edit_image=str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        build_request("x", edit_image=[str(tmp_path / "bad.png")])
    with pytest.raises(ValueError, match="zero size"):
        build_request("x", edit_image=Image.new("RGB", (0, 10)))
    rgba = random_image(32, 32, mode="RGBA")
    with pytest.warns(UserWarning, match="alpha channel; it is flattened on white"):
        row = build_request("x", edit_image=rgba).edit_rows[0]
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    assert np.array_equal(np.asarray(row.images[0]), np.asarray(flat))


def test_more_images_than_trained_warns():
    with pytest.warns(UserWarning, match="4 edit images for one prompt; .* trained with 1 to 3"):
        build_request("x", edit_image=[random_image(32, 32, seed=k) for k in range(4)])


def test_missing_processor_is_built_from_the_tokenizer(tiny_pipe):
    """tiny_pipe was loaded without processor_config: edits still run, with Qwen2.5-VL's settings, said once."""
    tiny_pipe.components.processor = None
    image = random_image(64, 64)
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="no processor_config was given"):
        first = tiny_pipe("add a hat", edit_image=image, noise=noise, num_inference_steps=1, cfg_scale=1.0, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the built processor is kept: no second warning
        again = tiny_pipe("add a hat", edit_image=image, noise=noise, num_inference_steps=1, cfg_scale=1.0, **QUIET)
    assert torch.equal(first, again)
    tiny_pipe.components.processor = None


def test_missing_models_fail_before_any_work(tiny_pipe):
    vae = tiny_pipe.components.vae
    tiny_pipe.components.vae = None
    try:
        with pytest.raises(ValueError, match="no vae loaded"):
            tiny_pipe("x", edit_image=random_image(32, 32), num_inference_steps=1, **QUIET)
    finally:
        tiny_pipe.components.vae = vae


def test_rope_interpolation_samples_the_target_grid():
    """Lowres-Fix: a half-size edit image takes every other target position; its frame stays 1."""
    target = ImageGrid(0, 8, 6)
    small = torch.zeros(16, 8, 6)  # latents of a 4x3 patch grid
    text = TextStates(torch.zeros(1, 5, 64), [5])
    axes = (8, 12, 12)
    seq = build_sequence(target, [[small]], text, axes, rope_interpolation=True)
    edit_phasors = seq.rotary.image[target.num_tokens :]
    rows, cols = torch.linspace(0, 7, 4).long(), torch.linspace(0, 5, 3).long()
    target_positions = image_positions(target).reshape(8, 6, 3)[rows][:, cols].reshape(-1, 3)
    target_positions[:, 0] = 1  # the frame is the edit image's own
    assert torch.allclose(edit_phasors, rope_tables(target_positions, axes))
    plain = build_sequence(target, [[small]], text, axes, rope_interpolation=False)
    assert torch.allclose(plain.rotary.image[target.num_tokens :], rope_tables(image_positions(ImageGrid(1, 4, 3)), axes))
    same_size = torch.zeros(16, 16, 12)  # as large as the target: interpolation changes nothing
    a = build_sequence(target, [[same_size]], text, axes, rope_interpolation=True).rotary.image
    b = build_sequence(target, [[same_size]], text, axes, rope_interpolation=False).rotary.image
    assert torch.equal(a, b)


def test_lowres_fix_call(tiny_pipe):
    """edit_image_auto_resize=False keeps the small edit image; edit_rope_interpolation spreads it over the output."""
    small = random_image(32, 48, seed=2)
    noise = torch.randn(1, 16, 12, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(edit_image=small, height=96, width=64, num_inference_steps=2, cfg_scale=1.0, noise=noise,
                  edit_image_auto_resize=False, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the built processor's note
        fixed = tiny_pipe("sharpen", edit_rope_interpolation=True, **kwargs)
        plain = tiny_pipe("sharpen", edit_rope_interpolation=False, **kwargs)
    assert fixed.shape == (1, 16, 12, 8) and torch.isfinite(fixed).all()
    assert rel_err(fixed, plain) > 1e-3  # the positions changed what the model saw
