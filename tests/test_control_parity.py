"""Spatial control parity with DiffSynth-Studio 2.1.12: Blockwise ControlNets, inpainting, In-Context control.

Both DiTs are tiny (2 layers, 2 heads x 32, text width 64, RoPE axes 8/12/12) and hold the same random weights,
and so do both tools' Blockwise ControlNets (2 blocks, 64 wide; a Canny-style one and an Inpaint one with 4 more
input features): the tensor names are the same (facts 1.2, 3.6). DiffSynth's DiT activation is switched to
tanh-GELU as in test_eligen_parity (its one known difference, not a control one); its ControlNet blocks use exact
GELU, as ours do, and are left alone.

Compared at the latent level, the VAE bypassed: the same control latents go to DiffSynth's model function as
`blockwise_controlnet_conditioning` (which it patchifies and projects with `img_in` itself, through its
`QwenImageBlockwiseMultiControlNet`) and to ours as `control_tokens` through `make_velocity_fn`, as our pipeline
calls it. Masks are PIL images read by each tool's own code. Also compared: the start/end window rule, the
pipeline-level inpainting step over a whole schedule, the In-Context control latents at frame 1, and the mask
readings at image size (blacked-out control image, the ControlNet's mask channel, the pipeline's inpaint mask).
"""

import numpy as np
import pytest
import torch
from PIL import Image

import diffsynth_reference as reference
from conftest import rel_err
from qistudio.components import Components
from qistudio.conditioning.control import (ControlNetInput, blacked_out, blurred_mask, control_tokens,
                                           inpaint_mask_tensor, mask_tensor)
from qistudio.models.controlnet import ControlNetConfig, QwenImageBlockwiseControlNet
from qistudio.models.dit import DiTConfig, QwenImageDiT
from qistudio.models.text_encoder import TextStates
from qistudio.pipeline import _inpaint_step, make_velocity_fn
from qistudio.request import GenerationRequest
from qistudio.sampling.sampler import sample_euler
from tiny_models import AXES, TEXT_DIM, _perturb

diffsynth_qwen_image = reference.require_diffsynth()  # skips the module when DiffSynth-Studio is not installed

CONFIG = DiTConfig(num_layers=2, num_heads=2, head_dim=32, text_dim=TEXT_DIM, axes_dim=AXES)
LATENT_H, LATENT_W = 6, 8  # a 3 x 4 patch grid; images 48 x 64
SIGMA = 0.75  # exact in float32, and so is DiffSynth's timestep 750 / 1000
TOLERANCE = 1e-5  # measured 1e-7 to 9e-7 (float32); a ControlNet scale of 0.75 for 0.7: 3.5e-2
CANNY, INPAINT = 0, 1  # controlnet_id of each loaded ControlNet


@pytest.fixture(scope="module")
def weights():
    """The shared weights: a perturbed tiny DiT's, then a Canny-style and an Inpaint ControlNet's."""
    torch.manual_seed(0)
    states = [_perturb(QwenImageDiT(CONFIG)).state_dict()]
    for extra in (0, 4):
        net = QwenImageBlockwiseControlNet(ControlNetConfig(num_layers=CONFIG.num_layers, dim=CONFIG.dim,
                                                            additional_in_channels=extra))
        states.append(_perturb(net, 0.1).state_dict())
    return [{k: v.clone() for k, v in state.items()} for state in states]


@pytest.fixture(scope="module")
def ours(weights):
    dit = QwenImageDiT(CONFIG)
    dit.load_state_dict(weights[0], strict=True)
    nets = []
    for extra, state in zip((0, 4), weights[1:]):
        net = QwenImageBlockwiseControlNet(ControlNetConfig(num_layers=CONFIG.num_layers, dim=CONFIG.dim,
                                                            additional_in_channels=extra))
        net.load_state_dict(state, strict=True)
        nets.append(net.eval())
    return Components(dit=dit.eval(), controlnets=nets)


@pytest.fixture(scope="module")
def theirs(weights):
    """(DiffSynth's DiT, its multi-ControlNet wrapper over the two ControlNets) with the same weights."""
    from diffsynth.models.qwen_image_controlnet import QwenImageBlockWiseControlNet

    dit = reference.tiny_dit(CONFIG.num_layers, CONFIG.num_heads, CONFIG.head_dim, TEXT_DIM, AXES)
    dit.load_state_dict(weights[0], strict=True)  # the same tensor names (facts 1.2)
    assert reference.use_tanh_gelu(dit) == 2 * CONFIG.num_layers
    nets = []
    for extra, state in zip((0, 4), weights[1:]):
        net = QwenImageBlockWiseControlNet(num_layers=CONFIG.num_layers, in_dim=64, additional_in_dim=extra,
                                           dim=CONFIG.dim)
        net.load_state_dict(state, strict=True)  # the same tensor names (facts 3.6)
        nets.append(net.float().eval())
    return dit, diffsynth_qwen_image.QwenImageBlockwiseMultiControlNet(nets)


def grey_mask(generator: torch.Generator, size: tuple[int, int]) -> Image.Image:
    """Random grey levels (not only 0 and 255), RGB, `size` = (width, height)."""
    levels = torch.randint(0, 256, (size[1], size[0]), generator=generator, dtype=torch.uint8).numpy()
    return Image.fromarray(levels, "L").convert("RGB")


def box_mask(box, size) -> Image.Image:
    mask = Image.new("RGB", size)
    mask.paste((255, 255, 255), box)
    return mask


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    return dict(
        latents=torch.randn(1, 16, LATENT_H, LATENT_W, generator=g),
        prompt=torch.randn(5, TEXT_DIM, generator=g),
        negative=torch.randn(3, TEXT_DIM, generator=g),
        canny=torch.randn(1, 16, LATENT_H, LATENT_W, generator=g),  # the control map's latents
        inpaint=torch.randn(1, 16, LATENT_H, LATENT_W, generator=g),  # the blacked-out image's latents
        mask=grey_mask(g, (LATENT_W, LATENT_H)),  # at the latent size: both readings are then a plain copy
        context=torch.randn(1, 16, LATENT_H, LATENT_W, generator=g),
    )


# ---- the two sides ------------------------------------------------------------------------------------------------

def _our_velocity(components, inputs, controls=(), context=None, step=0, num_steps=1, cfg_scale=1.0):
    """Our velocity (1, 16, h, w) through `make_velocity_fn`, as `generate_latents` makes it.

    controls: (ControlNetInput, control latents (1, 16, h, w), mask image or None); with guidance, the plain
    (DiffSynth's) rule and both branches in one batch.
    """
    request = GenerationRequest(prompts=["-"], height=8 * LATENT_H, width=8 * LATENT_W, cfg_scale=cfg_scale,
                                cfg_norm_rescale=False)
    positive = TextStates(inputs["prompt"][None], [inputs["prompt"].shape[0]])
    negative = TextStates(inputs["negative"][None], [inputs["negative"].shape[0]]) if cfg_scale != 1 else None
    tokens = [(control, control_tokens(latents, None if mask is None else mask_tensor(mask, LATENT_H, LATENT_W, "cpu")))
              for control, latents, mask in controls]
    conditions = [[] if context is None else [context[0]]]
    velocity = make_velocity_fn(components, request, positive, negative, conditions, tokens, num_steps)
    return velocity(inputs["latents"], SIGMA, step)


def _their_conditioning(latents: torch.Tensor, mask: Image.Image | None) -> torch.Tensor:
    """DiffSynth's conditioning tensor for one ControlNet input, its own mask channel appended for Inpaint."""
    if mask is None:
        return latents
    pipe = diffsynth_qwen_image.QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    unit = diffsynth_qwen_image.QwenImageUnit_BlockwiseControlNet()
    return unit.apply_controlnet_mask_on_latents(pipe, latents, mask)


def _their_velocity(theirs, inputs, controls=(), context=None, step=0, num_steps=1, prompt=None):
    """One call of DiffSynth's `model_fn_qwen_image`, as its pipeline makes it for one CFG branch at `step`.

    controls: (their ControlNetInput, control latents, mask image or None).
    """
    dit, multi = theirs
    prompt = inputs["prompt"] if prompt is None else prompt
    control = {}
    if controls:
        control = dict(blockwise_controlnet=multi, blockwise_controlnet_inputs=[c for c, _, _ in controls],
                       blockwise_controlnet_conditioning=[_their_conditioning(lat, m) for _, lat, m in controls])
    with torch.no_grad():
        return diffsynth_qwen_image.model_fn_qwen_image(
            dit=dit, latents=inputs["latents"], timestep=torch.tensor([SIGMA * 1000]), prompt_emb=prompt[None],
            prompt_emb_mask=torch.ones(1, prompt.shape[0], dtype=torch.long), height=8 * LATENT_H,
            width=8 * LATENT_W, progress_id=step, num_inference_steps=num_steps, context_latents=context, **control,
        )


def _pair(**fields):
    """The same ControlNet input for both tools: (ours, DiffSynth's)."""
    return ControlNetInput(**fields), diffsynth_qwen_image.ControlNetInput(**fields)


def _both(inputs, specs):
    """specs: (fields, latents name, with mask) -> our controls, their controls."""
    mine, yours = [], []
    for fields, latents, with_mask in specs:
        our_input, their_input = _pair(**fields)
        mask = inputs["mask"] if with_mask else None
        mine.append((our_input, inputs[latents], mask))
        yours.append((their_input, inputs[latents], mask))
    return mine, yours


# ---- 1-3: ControlNet injection ------------------------------------------------------------------------------------

def test_canny_controlnet_matches_diffsynth(ours, theirs, inputs):
    mine, yours = _both(inputs, [(dict(controlnet_id=CANNY, scale=0.7), "canny", False)])
    result = _our_velocity(ours, inputs, mine)
    expected = _their_velocity(theirs, inputs, yours)
    assert result.shape == expected.shape == (1, 16, LATENT_H, LATENT_W)
    assert rel_err(result, expected) <= TOLERANCE


def test_inpaint_controlnet_matches_diffsynth(ours, theirs, inputs):
    """17 latent channels (the 17th is 1 - mask, read by each tool from the same image), patchified to 68."""
    mine, yours = _both(inputs, [(dict(controlnet_id=INPAINT, scale=0.9), "inpaint", True)])
    assert rel_err(_our_velocity(ours, inputs, mine), _their_velocity(theirs, inputs, yours)) <= TOLERANCE


@pytest.mark.parametrize("step", [0, 3], ids=["both_active", "canny_only"])
def test_two_controlnets_match_diffsynth(ours, theirs, inputs, step):
    """Canny (id 0, the whole run) and Inpaint (id 1, progress 1 to 0.5) at once, at step 0 and 3 of 5."""
    specs = [(dict(controlnet_id=CANNY, scale=0.6), "canny", False),
             (dict(controlnet_id=INPAINT, scale=1.3, start=1.0, end=0.5), "inpaint", True)]
    mine, yours = _both(inputs, specs)
    result = _our_velocity(ours, inputs, mine, step=step, num_steps=5)
    assert rel_err(result, _their_velocity(theirs, inputs, yours, step=step, num_steps=5)) <= TOLERANCE
    if step == 3:  # the Inpaint ControlNet is off there: the same as the Canny one alone
        alone = _their_velocity(theirs, inputs, yours[:1], step=step, num_steps=5)
        assert rel_err(result, alone) <= TOLERANCE


def test_controlnet_with_guidance_matches_diffsynth(ours, theirs, inputs):
    """Both guidance branches in one batch share the projected control tokens; DiffSynth runs each branch."""
    mine, yours = _both(inputs, [(dict(controlnet_id=CANNY, scale=0.7), "canny", False)])
    result = _our_velocity(ours, inputs, mine, cfg_scale=3.0)
    positive = _their_velocity(theirs, inputs, yours)
    negative = _their_velocity(theirs, inputs, yours, prompt=inputs["negative"])
    assert rel_err(result, negative + 3.0 * (positive - negative)) <= TOLERANCE


# ---- 4: the start/end window --------------------------------------------------------------------------------------

WINDOWS = [(1.0, 0.0), (0.5, 0.0), (1.0, 0.5), (0.75, 0.25), (0.74, 0.26), (0.5, 0.5), (0.0, 0.0), (1.0, 1.0),
           (0.50009, 0.0), (0.49989, 0.0), (1.0, 0.75011), (0.3, 0.2)]


@pytest.mark.parametrize("num_steps", [1, 2, 5])
def test_window_matches_diffsynth(num_steps):
    """Our ControlNetInput.active against DiffSynth's own check, in `QwenImageBlockwiseMultiControlNet`: its
    residual sum stays the integer 0 when the input is skipped. Windows on, near (within and beyond its 1e-4
    slack) and between the progress values of the schedule."""
    from diffsynth.models.qwen_image_controlnet import QwenImageBlockWiseControlNet

    net = diffsynth_qwen_image.QwenImageBlockwiseMultiControlNet([QwenImageBlockWiseControlNet(num_layers=1, dim=8)])
    image = torch.ones(1, 1, 8)
    for start, end in WINDOWS:
        for step in range(num_steps):
            ours = ControlNetInput(start=start, end=end).active(step, num_steps)
            theirs = diffsynth_qwen_image.ControlNetInput(start=start, end=end)
            residual = net.blockwise_forward(image, [image], [theirs], progress_id=step, num_inference_steps=num_steps,
                                             block_id=0)
            assert ours == isinstance(residual, torch.Tensor), (start, end, step, num_steps)


# ---- 5: the pipeline-level inpainting step ------------------------------------------------------------------------

def test_inpaint_step_matches_diffsynth():
    """A whole 5-step schedule: DiffSynth's `BasePipeline.step` (velocity blended towards the input latents, then
    its scheduler's Euler step) against our `_inpaint_step` inside `sample_euler`, the same velocity function."""
    from diffsynth.diffusion.flow_match import FlowMatchScheduler

    g = torch.Generator().manual_seed(11)
    start, input_latents = (torch.randn(1, 16, LATENT_H, LATENT_W, generator=g) for _ in range(2))
    drift = torch.randn(5, 1, 16, LATENT_H, LATENT_W, generator=g)
    mask = blurred_mask(torch.rand(1, 1, LATENT_H, LATENT_W, generator=g), 1, 1.0)

    def velocity(x: torch.Tensor, step: int) -> torch.Tensor:  # depends on x, so differences would compound
        return drift[step] - 0.5 * x

    scheduler = FlowMatchScheduler("Qwen-Image")
    scheduler.set_timesteps(5, dynamic_shift_len=(LATENT_H // 2) * (LATENT_W // 2))
    pipe = diffsynth_qwen_image.QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    expected, x = [], start
    for step in range(len(scheduler.timesteps)):
        x = pipe.step(scheduler, latents=x, progress_id=step, noise_pred=velocity(x, step),
                      input_latents=input_latents, inpaint_mask=mask)
        expected.append(x)

    sigmas = torch.cat([scheduler.sigmas, torch.zeros(1)])  # ours ends the schedule with an explicit 0
    result = []
    sample_euler(lambda x, sigma, step: velocity(x, step), start, sigmas, callback=lambda i, s, x: result.append(x),
                 step_fn=_inpaint_step(input_latents, mask, sigmas))
    assert len(result) == len(expected) == 5
    for ours_x, their_x in zip(result, expected):
        assert torch.equal(ours_x, their_x)  # the same float32 operations, in the same order


# ---- 6: In-Context control ----------------------------------------------------------------------------------------

def test_context_latents_match_diffsynth(ours, theirs, inputs):
    """The control map's latents after the target tokens at RoPE frame 1; only the target comes out."""
    result = _our_velocity(ours, inputs, context=inputs["context"])
    assert rel_err(result, _their_velocity(theirs, inputs, context=inputs["context"])) <= TOLERANCE


def test_context_with_controlnet_matches_diffsynth(ours, theirs, inputs):
    """ControlNet residuals go to the target tokens only, not to the context tokens behind them."""
    mine, yours = _both(inputs, [(dict(controlnet_id=CANNY, scale=0.7), "canny", False)])
    result = _our_velocity(ours, inputs, mine, context=inputs["context"])
    assert rel_err(result, _their_velocity(theirs, inputs, yours, context=inputs["context"])) <= TOLERANCE


def test_the_comparison_can_fail(ours, theirs, inputs):
    """The tolerance separates real differences: each input moves DiffSynth's velocity far beyond it."""
    mine, yours = _both(inputs, [(dict(controlnet_id=CANNY, scale=0.7), "canny", False)])
    result = _our_velocity(ours, inputs, mine)
    assert rel_err(result, _their_velocity(theirs, inputs)) > 100 * TOLERANCE  # no ControlNet
    other_scale = [(diffsynth_qwen_image.ControlNetInput(controlnet_id=CANNY, scale=0.75), inputs["canny"], None)]
    assert rel_err(result, _their_velocity(theirs, inputs, other_scale)) > 10 * TOLERANCE
    mine, yours = _both(inputs, [(dict(controlnet_id=INPAINT), "inpaint", True)])
    flipped = [(yours[0][0], inputs["inpaint"], Image.fromarray(255 - np.asarray(inputs["mask"])))]
    assert rel_err(_our_velocity(ours, inputs, mine), _their_velocity(theirs, inputs, flipped)) > 10 * TOLERANCE
    with_context = _our_velocity(ours, inputs, context=inputs["context"])
    assert rel_err(with_context, _their_velocity(theirs, inputs)) > 100 * TOLERANCE


# ---- mask readings at image size ----------------------------------------------------------------------------------

def _masks(size):
    g = torch.Generator().manual_seed(sum(size))
    return {"box_on_grid": box_mask((16, 8, 48, 40), size), "box_off_grid": box_mask((11, 3, 45, 37), size),
            "grey": grey_mask(g, size)}


SIZES = [(64, 48), (50, 37), (128, 96)]  # the output's size, smaller and larger masks


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_controlnet_mask_reading_matches_diffsynth(size):
    """The Inpaint ControlNet's inputs from a mask image: the control image blacked out under it, and the
    mask channel (1 - mask) on the latent grid, by DiffSynth's `QwenImageUnit_BlockwiseControlNet` and by ours."""
    unit = diffsynth_qwen_image.QwenImageUnit_BlockwiseControlNet()
    pipe = diffsynth_qwen_image.QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    latents = torch.zeros(1, 16, LATENT_H, LATENT_W)
    for name, mask in _masks(size).items():
        expected = np.asarray(unit.apply_controlnet_mask_on_image(pipe, image, mask))
        assert np.array_equal(np.asarray(blacked_out(image, mask)), expected), name
        channel = unit.apply_controlnet_mask_on_latents(pipe, latents, mask)[:, 16:]
        ours = control_tokens(latents, mask_tensor(mask, LATENT_H, LATENT_W, "cpu"))
        torch.testing.assert_close(ours, control_tokens(latents, 1 - channel), rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("blur", [None, (1, 1.0)], ids=["sharp", "blurred"])
def test_inpaint_mask_reading_matches_diffsynth(size, blur):
    """The pipeline-level inpaint mask: DiffSynth's `QwenImageUnit_Inpaint` (PIL resize to the latent grid,
    then the optional blur) against `inpaint_mask_tensor` + `blurred_mask`."""
    unit = diffsynth_qwen_image.QwenImageUnit_Inpaint()
    pipe = diffsynth_qwen_image.QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    blur_size, blur_sigma = blur or (None, None)
    for name, mask in _masks(size).items():
        expected = unit.process(pipe, mask, 8 * LATENT_H, 8 * LATENT_W, blur_size, blur_sigma)["inpaint_mask"]
        ours = blurred_mask(inpaint_mask_tensor(mask, LATENT_H, LATENT_W, "cpu"), blur_size, blur_sigma)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6, msg=name)


# ---- the same readings inside our pipeline's VAE phase ------------------------------------------------------------

@pytest.fixture(scope="module")
def encoded(ours):
    """Our `encode_images` on an inpainting request with the Inpaint ControlNet (tiny random VAE), and what it read.

    The mask is off the latent grid and half the output's size, so every reading rule shows."""
    from qistudio.demo import DEMO_VAE
    from qistudio.models.vae import QwenImageVAE
    from qistudio.pipeline import encode_images
    from qistudio.request import build_request

    torch.manual_seed(0)
    vae = _perturb(QwenImageVAE(DEMO_VAE), 0.02)
    components = Components(dit=ours.dit, vae=vae, controlnets=ours.controlnets)
    rng = np.random.default_rng(4)
    image, control = (Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(2))
    mask = box_mask((5, 3, 23, 17), (32, 24))
    request = build_request("-", height=48, width=64, input_image=image, inpaint_mask=mask, cfg_scale=1.0,
                            blockwise_controlnet_inputs=[ControlNetInput(image=control, controlnet_id=INPAINT,
                                                                         inpaint_mask=mask)])
    noise = torch.randn(1, 16, LATENT_H, LATENT_W)
    return components, request, encode_images(components, request, noise, 1.0, "cpu", torch.float32), control, mask


def test_pipeline_controlnet_inputs_match_diffsynth(encoded):
    """The Inpaint ControlNet's features: DiffSynth's unit blacks out the image, and after our VAE (the VAE is
    compared elsewhere) appends its mask channel; ours come from `encode_images`."""
    from qistudio.imageio import image_to_tensor
    from qistudio.ops.packing import patchify

    components, _, images, control, mask = encoded
    unit = diffsynth_qwen_image.QwenImageUnit_BlockwiseControlNet()
    pipe = diffsynth_qwen_image.QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    with torch.no_grad():
        latents = components.vae.encode(image_to_tensor(unit.apply_controlnet_mask_on_image(pipe, control, mask)))
    expected = patchify(unit.apply_controlnet_mask_on_latents(pipe, latents, mask))
    (_, tokens), = images.controls
    assert tokens.shape == expected.shape == (1, (LATENT_H // 2) * (LATENT_W // 2), 68)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-6)


def test_pipeline_inpaint_mask_matches_diffsynth(encoded):
    _, request, images, _, mask = encoded
    pipe = diffsynth_qwen_image.QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    expected = diffsynth_qwen_image.QwenImageUnit_Inpaint().process(pipe, mask, 48, 64, None, None)["inpaint_mask"]
    torch.testing.assert_close(images.inpaint_mask, expected, rtol=0, atol=1e-6)
