"""Attacks on pipe(...)'s inputs and on image files: every bad value is one InputError naming the argument before
any model runs; 16-bit, float, rotated, paletted and hostile image files are read as a user means them."""

import contextlib
import io
import math
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from qistudio import ControlNetInput, ModelConfig, QwenImagePipeline
from qistudio.imageio import load_image, load_mask, read_image
from qistudio.request import MAX_SIZE, build_request
from qistudio.sampling.schedule import flow_sigmas
from qistudio.validation import InputError

FAST = dict(height=32, width=32, num_inference_steps=1, progress_bar_cmd=lambda it: it, output_type="latent")
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pipe(demo_model):
    """The demo model (tiny, random weights; the session's) loaded once for this module."""
    folder = demo_model
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(folder / name)) for name in ("transformer", "text_encoder", "vae")],
        tokenizer_config=ModelConfig(path=str(folder / "tokenizer")),
    )


@pytest.fixture
def guarded(pipe):
    """The pipeline with a forward pre-hook on every module of every model: any model run fails the test."""
    def refuse(module, args):
        raise AssertionError(f"{type(module).__name__} ran before the input was refused")

    handles = [m.register_forward_pre_hook(refuse) for model in (pipe.dit, pipe.vae, pipe.text_encoder)
               for m in model.modules()]
    yield pipe
    for handle in handles:
        handle.remove()


def rgb(width=32, height=32, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


IMAGE = rgb()
NAN, INF = float("nan"), float("inf")
with_image = dict(input_image=IMAGE, denoising_strength=0.5)
with_mask = dict(input_image=IMAGE, inpaint_mask=IMAGE)

# (keyword arguments, the argument the message must name)
BAD = [
    *[(dict(cfg_scale=v), "cfg_scale") for v in (NAN, INF, -INF, "4", True, None, [4.0], torch.tensor(4.0))],
    *[(dict(denoising_strength=v, input_image=IMAGE), "denoising_strength") for v in (NAN, 0, 1.5, "0.5", True)],
    *[(dict(exponential_shift_mu=v), "exponential_shift_mu") for v in (NAN, INF, 1e6, -1e3, "0.8", True)],
    *[(dict(sigmas=v), "sigmas") for v in ([1.0, NAN, 0.0], [1.0, INF], ["a"], [], "1,0", [0.5, 0.9], [[1.0]],
                                          torch.ones(1, 2), [True, False], 1.0, [1.5, 0.0], [1.0, -0.5])],
    *[(dict(noise=v), "noise") for v in (torch.full((1, 16, 4, 4), NAN), torch.zeros(1, 16, 4, 4).index_fill(3, torch.tensor([2]), INF),
                                         torch.zeros(1, 16, 4, 4, dtype=torch.int64), np.zeros((1, 16, 4, 4), np.float32),
                                         torch.zeros(1, 16, 3, 4), [0.0])],
    *[(dict(height=v), "height") for v in (True, 32.0, "32", 0, -16, 10**6, np.float32(32), MAX_SIZE + 1)],
    *[(dict(width=v), "width") for v in (False, 31.5, b"32", -1, 2**40)],
    *[(dict(height=32, width=None), "height and width")],
    *[(dict(seed=v), "seed") for v in (-1, 2**64, 1.5, "1", True, np.float64(3), [1])],
    *[(dict(num_images=v), "num_images") for v in (0, True, 2.0, 10**6, "2", None)],
    *[(dict(num_inference_steps=v), "num_inference_steps") for v in (0, 1.0, True, "2", 10**9, None)],
    *[(dict(prompt=v), "prompt") for v in ({"text": "a cat"}, None, 3, [], ["a", 3], b"a cat", ("a", None))],
    *[(dict(negative_prompt=v), "negative_prompt") for v in (3, ["blurry"], b"blurry", NAN)],
    *[(dict(cfg_norm_rescale=v), "cfg_norm_rescale") for v in ("yes", 1)],  # None: the reference's default
    *[(dict(cfg_batch=v), "cfg_batch") for v in ("False", 0)],
    *[(dict(tiled=v), "tiled") for v in ("yes", 2)],
    *[(dict(zero_cond_t=v), "zero_cond_t") for v in ("no", 0)],
    *[(dict(edit_image_auto_resize=v), "edit_image_auto_resize") for v in ("no", None)],
    *[(dict(edit_rope_interpolation=v), "edit_rope_interpolation") for v in ("no", 1)],
    *[(dict(eligen_enable_on_negative=v, eligen_entity_prompts=["a"], eligen_entity_masks=[IMAGE]),
       "eligen_enable_on_negative") for v in ("yes", 1)],
    *[(dict(inpaint_blur_size=v, inpaint_blur_sigma=1.0, **with_mask), "inpaint_blur_size")
      for v in (-1, 1.5, NAN, True, 1000)],
    *[(dict(inpaint_blur_sigma=v, inpaint_blur_size=1, **with_mask), "inpaint_blur_sigma") for v in (NAN, -1.0, INF, "1")],
    *[(dict(tile_size=v), "tile_size") for v in (0, (0, 8), (8,), (8, 8, 8), 1.5, NAN, "8", True, None)],
    *[(dict(tile_stride=v), "tile_stride") for v in (-1, (8, 0.5), NAN)],
    (dict(tile_size=8, tile_stride=16), "tile_stride"),
    *[(dict(rand_device=v), "rand_device") for v in ("foo", 3, None, "cpu:x")],
    *[(dict(callback=v), "callback") for v in (3, "print")],
    (dict(progress_bar_cmd=None), "progress_bar_cmd"),
    *[(dict(output_type=v), "output_type") for v in ("np", None, ["pil"])],
    *[(dict(input_image=v, denoising_strength=0.5), "input_image")
      for v in (3, {"a": 1}, np.zeros((4, 4, 3), np.uint8), "/no/such/file.png", Image.new("RGB", (0, 4)))],
    *[(dict(edit_image=v), "edit_image") for v in (3, {"a": 1}, [IMAGE, 3], "/no/such/file.png", [[]])],
    (dict(edit_image=Image.new("RGB", (1, 2000)), height=None, width=None), "edit image"),  # 32x45,792 at its aspect
    *[(dict(context_image=v), "context_image") for v in (3, "/no/such/file.png")],
    *[(dict(inpaint_mask=v, input_image=IMAGE), "inpaint_mask") for v in (3, "/no/such/file.png")],
    (dict(inpaint_mask=IMAGE), "inpaint_mask"),
    *[(dict(eligen_entity_prompts=p, eligen_entity_masks=m), name) for p, m, name in (
        ("a cat", [IMAGE], "eligen_entity_prompts"), (["a cat"], IMAGE, "eligen_entity_masks"),
        ([3], [IMAGE], "eligen_entity_prompts"), (["a cat"], [3], "eligen_entity_masks"),
        (["a cat"], [Image.new("RGB", (32, 32))], "eligen_entity_masks"), (["a", "b"], [IMAGE], "eligen_entity_masks"))],
    *[(dict(blockwise_controlnet_inputs=v), "blockwise_controlnet_inputs") for v in (
        ControlNetInput(image=IMAGE), ["canny"], [ControlNetInput()], [ControlNetInput(image=3)],
        [ControlNetInput(image=IMAGE, scale=NAN)], [ControlNetInput(image=IMAGE, scale="1")],
        [ControlNetInput(image=IMAGE, start=INF)], [ControlNetInput(image=IMAGE, end=NAN)],
        [ControlNetInput(image=IMAGE, start=2.0)], [ControlNetInput(image=IMAGE, start=0.2, end=0.5)],
        [ControlNetInput(image=IMAGE, controlnet_id=True)], [ControlNetInput(image=IMAGE, controlnet_id=-1)],
        [ControlNetInput(image=IMAGE, controlnet_id=0.0)], [ControlNetInput(image=IMAGE, inpaint_mask=3)])],
    (dict(blockwise_controlnet_inputs=[ControlNetInput(image=IMAGE)]), "controlnet_id=0"),  # none is loaded
]


@pytest.mark.parametrize("kwargs, name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_argument_is_one_error_naming_it_before_any_model_runs(guarded, kwargs, name):
    arguments = {**FAST, **kwargs}
    prompt = arguments.pop("prompt", "a cat")
    with pytest.raises(InputError) as caught:
        guarded(prompt, **arguments)
    assert name in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)  # one message, not a dump


def test_numpy_scalars_are_accepted_and_come_back_plain():
    request = build_request(["a cat"], height=np.int64(32), width=np.uint16(48), seed=np.uint64(2**64 - 1),
                            num_images=np.int32(2), num_inference_steps=np.int8(3), cfg_scale=np.float32(2.5),
                            denoising_strength=np.float64(1.0), tiled=np.bool_(True), tile_size=(np.int64(8), 8),
                            tile_stride=np.int16(4))
    values = (request.height, request.width, request.seed, request.num_images, request.num_inference_steps)
    assert values == (32, 48, 2**64 - 1, 2, 3) and all(type(v) is int for v in values)
    assert type(request.cfg_scale) is float and request.cfg_scale == 2.5 and request.tiled is True
    assert request.tile_size == (8, 8) and type(request.tile_size[0]) is int and type(request.tile_stride) is int
    torch.Generator().manual_seed(request.seed)  # the largest seed is one torch takes


@given(st.floats(allow_nan=True, allow_infinity=True))
@FUZZ
def test_any_float_cfg_is_accepted_exactly_when_finite(value):
    if math.isfinite(value):
        assert build_request("x", cfg_scale=value, height=32, width=32).cfg_scale == value
    else:
        with pytest.raises(InputError, match="cfg_scale must be a finite number"):
            build_request("x", cfg_scale=value, height=32, width=32)


@given(st.integers(min_value=-(2**70), max_value=2**70))
@FUZZ
def test_seed_is_accepted_exactly_in_the_generator_range(seed):
    if 0 <= seed < 2**64:
        torch.Generator().manual_seed(build_request("x", seed=seed, height=32, width=32).seed)
    else:
        with pytest.raises(InputError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
            build_request("x", seed=seed, height=32, width=32)


@given(st.integers(min_value=-(2**40), max_value=2**40), st.sampled_from(["height", "width"]))
@FUZZ
def test_any_integer_size_is_rounded_or_refused(value, name):
    sizes = {"height": 32, "width": 32, name: value}
    if 1 <= value <= MAX_SIZE:
        with pytest.warns(UserWarning, match="not a multiple of 16") if value % 16 else contextlib.nullcontext():
            request = build_request("x", **sizes)
        assert getattr(request, name) == -(-value // 16) * 16
    else:
        with pytest.raises(InputError, match=f"{name} must be an integer in \\[1, {MAX_SIZE}\\]"):
            build_request("x", **sizes)


@given(st.floats(min_value=-1e6, max_value=1e6), st.integers(1, 50))
@FUZZ
def test_shift_mu_in_range_gives_finite_sigmas(mu, steps):
    """Every mu the request accepts gives a finite, decreasing schedule (no overflow, no 0/0)."""
    try:
        request = build_request("x", exponential_shift_mu=mu, num_inference_steps=steps, height=32, width=32)
    except InputError as e:
        assert "exponential_shift_mu" in str(e) and abs(mu) > 20
        return
    sigmas = flow_sigmas(steps, 4, 1.0, request.exponential_shift_mu)
    assert torch.isfinite(sigmas).all() and bool((sigmas[1:] <= sigmas[:-1]).all())


@given(st.integers(0, 16 * 4 * 4 - 1), st.sampled_from([NAN, INF, -INF]))
@FUZZ
def test_one_non_finite_value_anywhere_in_the_noise_is_refused(position, value):
    noise = torch.randn(1, 16, 4, 4)
    noise.view(-1)[position] = value
    with pytest.raises(InputError, match=r"noise has 1 non-finite value\(s\)"):
        build_request("x", noise=noise, height=32, width=32)


GARBAGE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                            st.dictionaries(st.text(max_size=3), inner, max_size=2)),
    max_leaves=6,
)
ARGUMENTS = ["negative_prompt", "cfg_scale", "cfg_norm_rescale", "num_inference_steps", "height", "width",
             "num_images", "seed", "rand_device", "noise", "denoising_strength", "sigmas", "exponential_shift_mu",
             "edit_image_auto_resize", "edit_rope_interpolation", "zero_cond_t", "inpaint_blur_size",
             "inpaint_blur_sigma", "tiled", "tile_size", "tile_stride", "cfg_batch", "callback", "progress_bar_cmd",
             "input_image", "edit_image", "context_image", "eligen_entity_prompts", "blockwise_controlnet_inputs"]


@given(st.sampled_from(ARGUMENTS), GARBAGE)
@settings(max_examples=300, deadline=None, derandomize=True)
def test_garbage_in_any_argument_is_accepted_or_one_input_error(name, value):
    """Whatever JSON-like value lands in whichever argument, the result is a request or an InputError that
    names the argument: never a TypeError, AttributeError or torch error from deep inside."""
    kwargs = {"height": 32, "width": 32, name: value}
    if name == "height":
        kwargs["width"] = None if value is None else 32
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notes on accepted values (size rounding, negative_prompt=None)
            build_request("x", **kwargs)
    except InputError as e:
        assert name in str(e), str(e)


def test_negative_prompt_none_means_no_guidance(pipe):
    """diffusers' rule: without a negative prompt there is no guidance (and a warning says cfg does nothing)."""
    arguments = dict(seed=5, **FAST)
    unguided = pipe("a cat", cfg_scale=1.0, **arguments)
    with pytest.warns(UserWarning, match="negative_prompt=None: no negative prompt"):
        none = pipe("a cat", negative_prompt=None, cfg_scale=4.0, **arguments)
    assert torch.equal(none, unguided)
    empty = pipe("a cat", negative_prompt="", cfg_scale=4.0, **arguments)
    assert not torch.allclose(empty, unguided)
    as_text = pipe("a cat", negative_prompt="None", cfg_scale=4.0, **arguments)  # what None used to become
    assert not torch.allclose(as_text, none)


# ---- image files ------------------------------------------------------------------------------------------------


def write_png(path, width, height, bit_depth, color_type, rows: np.ndarray) -> None:
    """A PNG written byte by byte (PIL writes no 16-bit RGB), rows already in the file's big-endian layout."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


GRADIENT = np.array([[0, 257, 257 * 100, 32767, 40000, 65535]], dtype=np.uint16)
EXPECTED = [0, 1, 100, 127, 156, 255]  # round(v / 257): the full 16-bit range onto 0..255


def test_16_bit_png_gradient_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "depth16.png"
    write_png(path, 6, 1, 16, 0, GRADIENT.astype(">u2"))
    with Image.open(path) as raw:
        assert raw.mode == "I;16"  # what PIL makes of it; its own convert("L") would give 0, 255, 255, ...
    for image in (load_image(path), load_mask(path)):
        assert image.mode == "RGB" and np.asarray(image)[0, :, 0].tolist() == EXPECTED
    request = build_request("x", input_image=str(path), denoising_strength=0.5, height=32, width=32)
    assert np.asarray(request.input_image)[0, :, 1].tolist() == EXPECTED


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_images_in_memory_are_scaled(mode):
    data = GRADIENT.astype(">u2" if mode == "I;16B" else "<u2" if mode == "I;16" else "<i4").tobytes()
    image = Image.frombytes(mode, (6, 1), data)
    assert np.asarray(load_image(image))[0, :, 2].tolist() == EXPECTED


def test_16_bit_pgm_opened_as_mode_i_is_scaled(tmp_path):
    path = tmp_path / "depth.pgm"
    path.write_bytes(b"P5 6 1 65535\n" + GRADIENT.astype(">u2").tobytes())
    with Image.open(path) as raw:
        assert raw.mode in ("I", "I;16")
    assert np.asarray(load_image(path))[0, :, 0].tolist() == EXPECTED


def test_16_bit_rgb_png_keeps_its_colours(tmp_path):
    rows = np.stack([GRADIENT[0], 65535 - GRADIENT[0], np.zeros(6, np.uint16)], axis=-1)[None].astype(">u2")
    write_png(tmp_path / "rgb16.png", 6, 1, 16, 2, rows)
    pixels = np.asarray(load_image(tmp_path / "rgb16.png"))[0]
    assert np.abs(pixels[:, 0].astype(int) - EXPECTED).max() <= 1 and pixels[-1].tolist() == [255, 0, 0]


def test_float_tiff_is_read_as_0_to_1(tmp_path):
    path = tmp_path / "depth.tif"
    Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)).save(path)
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 64, 128, 255]
    assert np.asarray(load_mask(path))[0, :, 0].tolist() == [0, 64, 128, 255]


def test_float_image_outside_0_1_is_clipped_with_a_warning():
    image = Image.fromarray(np.array([[-1.0, 0.5, 3.0]], dtype=np.float32))
    with pytest.warns(UserWarning, match=r"input_image: float image values span \[-1, 3\]; .* clipped"):
        pixels = np.asarray(load_image(image, "input_image"))[0, :, 0].tolist()
    assert pixels == [0, 128, 255]


@pytest.mark.parametrize("value", [NAN, INF])
def test_float_image_with_non_finite_pixels_is_refused(tmp_path, value):
    path = tmp_path / "bad.tif"
    Image.fromarray(np.array([[0.5, value]], dtype=np.float32)).save(path)
    with pytest.raises(InputError, match="edit_image '.*bad.tif': the float image has NaN or infinite pixels"):
        build_request("x", edit_image=str(path))


def exif_rotated_jpeg(path, width=40, height=24):
    """A landscape-stored JPEG whose EXIF says 'rotate 90° clockwise to view' (orientation 6), as phones write."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)  # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied(tmp_path):
    path = exif_rotated_jpeg(tmp_path / "portrait.jpg")
    image = load_image(path)
    assert image.size == (24, 40)  # shown upright: a portrait
    top, bottom = np.asarray(image)[2, 12], np.asarray(image)[-3, 12]
    assert top[0] > 200 and top[1] < 60 and bottom[0] < 60  # stored left half is now the top half
    with Image.open(path) as opened:  # a PIL image the caller opened carries the same EXIF
        assert load_image(opened).size == (24, 40)
    rows = build_request("x", edit_image=str(path)).edit_rows
    assert rows[0].images[0].size == (24, 40)


def test_damaged_exif_block_keeps_the_pixels(tmp_path, monkeypatch):
    path = exif_rotated_jpeg(tmp_path / "odd.jpg")
    data = bytearray(path.read_bytes())
    at = data.index(b"Exif\x00\x00") + 6
    data[at : at + 8] = b"MM\x00\x2a\xff\xff\xff\xff"  # the first directory's offset points past the block
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL says "Corrupt EXIF data" and reads no orientation
        assert load_image(path).size == (40, 24)

    def broken(image, **kwargs):  # what other PIL versions may do with such a block
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    with warnings.catch_warnings(record=True) as caught, Image.open(path) as opened:
        warnings.simplefilter("always")
        assert load_image(opened, "edit_image").size == (40, 24)
    assert any("edit_image: its EXIF orientation could not be read" in str(w.message) for w in caught)


def test_palette_cmyk_and_alpha_as_before():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    assert np.asarray(load_image(palette))[0, 0].tolist() == [10, 20, 30]
    assert np.asarray(load_image(Image.new("CMYK", (4, 4), (0, 0, 0, 0))))[0, 0].tolist() == [255, 255, 255]
    transparent = Image.new("LA", (4, 4), (0, 0))
    with pytest.warns(UserWarning, match="alpha channel; it is flattened on white"):
        assert np.asarray(load_image(transparent))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_mask(transparent))[0, 0].tolist() == [0, 0, 0]  # a mask drops alpha instead
    with pytest.warns(UserWarning, match="alpha channel"):
        load_image(Image.new("PA", (4, 4)))
    keyed = Image.new("P", (4, 4), 0)
    keyed.info["transparency"] = 0
    with pytest.warns(UserWarning, match="alpha channel"):
        assert np.asarray(load_image(keyed))[0, 0].tolist() == [255, 255, 255]
    for mode in ("1", "L", "YCbCr", "RGBX"):
        assert load_image(Image.new(mode, (3, 2))).size == (3, 2)
    for mode in ("La", "RGBa"):  # premultiplied alpha, which PIL cannot convert to RGB directly
        with pytest.warns(UserWarning, match="alpha channel"):
            assert load_image(Image.new(mode, (3, 2))).size == (3, 2)


def test_entity_mask_goes_through_the_same_reader(tmp_path):
    """A 16-bit mask at 30000 (under half of 65535) covers nothing; PIL's clipping would have made it all white."""
    path = tmp_path / "mask16.png"
    write_png(path, 32, 32, 16, 0, np.full((32, 32), 30000, dtype=">u2"))
    with pytest.raises(InputError, match="entity mask 0 .* is empty"):
        build_request("x", eligen_entity_prompts=["a cat"], eligen_entity_masks=[str(path)], height=32, width=32)
    write_png(path, 32, 32, 16, 0, np.full((32, 32), 60000, dtype=">u2"))
    request = build_request("x", eligen_entity_prompts=["a cat"], eligen_entity_masks=[str(path)], height=32, width=32)
    assert bool(request.entities.token_masks.all())


def test_control_map_and_inpaint_mask_go_through_the_same_reader(tmp_path):
    path = tmp_path / "depth16.png"
    write_png(path, 6, 1, 16, 0, GRADIENT.astype(">u2"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        request = build_request("x", input_image=IMAGE, inpaint_mask=str(path), context_image=str(path),
                                blockwise_controlnet_inputs=[ControlNetInput(image=str(path), inpaint_mask=str(path))],
                                height=32, width=32)
    assert any("context_image is 6x1; resized" in str(w.message) for w in caught)
    assert np.asarray(request.context_image).shape == (32, 32, 3)
    control = request.controlnet_inputs[0]
    for image in (request.inpaint_mask, control.image, control.inpaint_mask):
        assert np.asarray(image)[0, :, 0].tolist() == EXPECTED


def test_decompression_bomb_is_one_error_naming_the_file_and_its_size(tmp_path, monkeypatch):
    warn_zone, error_zone = tmp_path / "big.png", tmp_path / "huge.png"
    Image.new("L", (40, 40)).save(warn_zone)  # 1600 pixels: PIL only warns (over MAX_IMAGE_PIXELS)
    Image.new("L", (100, 100)).save(error_zone)  # 10000: PIL raises (over twice the limit)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for path, pixels in ((warn_zone, 1600), (error_zone, 10000)):
        with pytest.raises(InputError) as caught:
            build_request("x", edit_image=str(path))
        message = str(caught.value)
        assert f"edit_image: '{path}' is too large" in message and f"{pixels} pixels" in message
        assert "MAX_IMAGE_PIXELS (now 1000)" in message


def test_zero_size_truncated_and_non_image_files(tmp_path):
    with pytest.raises(InputError, match="context_image: image has zero size"):
        build_request("x", context_image=Image.new("RGB", (5, 0)))
    good = io.BytesIO()
    rgb(64, 64).save(good, format="PNG")
    (tmp_path / "cut.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "notes.png").write_text("this is not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    for name in ("cut.png", "notes.png", "empty.png", "folder.png"):
        with pytest.raises(InputError, match=f"input_image: cannot read image '.*{name}'"):
            build_request("x", input_image=str(tmp_path / name), denoising_strength=0.5)


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    image = rgb(24, 16)
    if fmt == "I16":
        Image.frombytes("I;16", (24, 16), np.arange(24 * 16, dtype="<u2").tobytes() * 1).save(buffer, format="PNG")
    elif fmt == "F":
        Image.fromarray(np.linspace(0, 1, 24 * 16, dtype=np.float32).reshape(16, 24)).save(buffer, format="TIFF")
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


SOURCES = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "TIFF", "GIF", "BMP", "WEBP", "I16", "F")}


@given(st.sampled_from(sorted(SOURCES)), st.data())
@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_damaged_files_load_or_fail_with_one_input_error(tmp_path, fmt, data):
    """Truncated or byte-flipped files of every format: an RGB image or one InputError naming the file."""
    raw = bytearray(SOURCES[fmt])
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / f"damaged.{fmt.lower()}"
    path.write_bytes(bytes(raw))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's own notes on damaged metadata ("Corrupt EXIF data", ...)
            image = read_image(path, "edit_image")
    except InputError as e:
        assert str(e).startswith("edit_image") and "damaged" in str(e)
    else:
        assert load_image(image).mode == "RGB"
