"""Blockwise ControlNet, inpainting and In-Context control through the pipeline (tiny models, CPU)."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import checkpoint_listing, rel_err
from qistudio import ControlNetInput, ModelConfig, QwenImagePipeline
from qistudio.models.controlnet import ControlNetConfig, QwenImageBlockwiseControlNet
from qistudio.weights.build import build_empty
from qistudio.weights.formats import CONTROLNET, detect_layout

H, W = 48, 64
QUIET = dict(progress_bar_cmd=lambda x: x, output_type="latent", height=H, width=W, num_inference_steps=3)


def random_image(seed=0, size=(W, H)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_controlnet(path, inpaint=False, zero=False, seed=0):
    torch.manual_seed(seed)
    net = QwenImageBlockwiseControlNet(ControlNetConfig(num_layers=2, dim=64, additional_in_channels=4 if inpaint else 0))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if zero:
        net.zero_init()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def control_pipe(tiny_repo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnets")
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[
            *(ModelConfig(path=str(tiny_repo / name)) for name in ("transformer", "text_encoder", "vae")),
            ModelConfig(path=str(write_controlnet(folder / "canny.safetensors"))),
            ModelConfig(path=str(write_controlnet(folder / "inpaint.safetensors", inpaint=True, seed=1))),
            ModelConfig(path=str(write_controlnet(folder / "zero.safetensors", zero=True, seed=2))),
        ],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )  # fmt: skip


@pytest.mark.parametrize("name, extra", [("qwen_image_blockwise_controlnet", 0), ("qwen_image_blockwise_controlnet_inpaint", 4)])
def test_released_controlnet_layouts_build(name, extra):
    shapes = checkpoint_listing(name)
    layout = detect_layout(shapes)
    model = build_empty(layout.kind, {layout.key_map(k): v for k, v in shapes.items()}, None)
    assert layout.kind == CONTROLNET and model.config.additional_in_channels == extra and model.config.num_layers == 60
    assert {k: tuple(p.shape) for k, p in model.named_parameters()} == {layout.key_map(k): v for k, v in shapes.items()}


def test_controlnets_load_in_order_and_steer(control_pipe):
    assert [net.config.additional_in_channels for net in control_pipe.controlnets] == [0, 4, 0]
    kwargs = dict(seed=3, cfg_scale=2.0, negative_prompt="blur", **QUIET)
    plain = control_pipe("a house", **kwargs)
    edges = random_image(1)
    zero = control_pipe("a house", blockwise_controlnet_inputs=[ControlNetInput(image=edges, controlnet_id=2)], **kwargs)
    assert torch.equal(zero, plain)  # a zero-initialised ControlNet changes nothing
    off = control_pipe("a house", blockwise_controlnet_inputs=[ControlNetInput(image=edges, scale=0.0)], **kwargs)
    assert torch.equal(off, plain)
    on = control_pipe("a house", blockwise_controlnet_inputs=[ControlNetInput(image=edges, scale=1.0)], **kwargs)
    assert rel_err(on, plain) > 1e-3
    # Active only for the last step of three (progress 0): the first two steps equal the plain run's.
    seen = {}
    late = ControlNetInput(image=edges, start=0.1, end=0.0)
    control_pipe("a house", blockwise_controlnet_inputs=[late], callback=lambda i, s, x: seen.setdefault(i, x), **kwargs)
    plain_steps = {}
    control_pipe("a house", callback=lambda i, s, x: plain_steps.setdefault(i, x), **kwargs)
    assert torch.equal(seen[1], plain_steps[1]) and not torch.equal(seen[2], plain_steps[2])


def test_canny_and_inpaint_controlnets_together(control_pipe):
    mask = Image.new("L", (W, H))
    mask.paste(255, (16, 8, 48, 40))
    both = [ControlNetInput(image=random_image(2), controlnet_id=0, scale=0.8),
            ControlNetInput(image=random_image(3), controlnet_id=1, inpaint_mask=mask)]
    kwargs = dict(seed=4, cfg_scale=1.0, **QUIET)
    combined = control_pipe("a garden", blockwise_controlnet_inputs=both, **kwargs)
    canny = control_pipe("a garden", blockwise_controlnet_inputs=both[:1], **kwargs)
    assert torch.isfinite(combined).all() and rel_err(combined, canny) > 1e-4


def test_inpainting_keeps_the_unmasked_region(control_pipe):
    """Unmasked latents follow the straight path back to the input: at the end they equal the input's latents."""
    source = random_image(5)
    mask = Image.new("RGB", (W, H))
    mask.paste((255, 255, 255), (0, 0, 32, 48))  # repaint the left half
    out = control_pipe("a lake", input_image=source, inpaint_mask=mask, denoising_strength=1.0, seed=5, **QUIET)
    from qistudio.imageio import image_to_tensor

    with torch.no_grad():
        input_latents = control_pipe.vae.encode(image_to_tensor(source))
    # DiffSynth-Studio's mask rule (PIL resize to the latent grid) softens the edge by about one latent column.
    keep = (slice(None), slice(None), slice(None), slice(5, 8))  # right of the edge, on the 6x8 latent grid
    assert torch.allclose(out[keep], input_latents[keep], atol=1e-5)
    assert rel_err(out[..., :3], input_latents[..., :3]) > 1e-2  # the masked half was repainted
    blurred = control_pipe("a lake", input_image=source, inpaint_mask=mask, inpaint_blur_size=1, inpaint_blur_sigma=1.0,
                           seed=5, **QUIET)
    assert not torch.equal(blurred, out)


def test_context_image_is_appended_with_the_trigger(control_pipe):
    context = random_image(6, size=(32, 24))  # another size: resized to the output, said once
    with pytest.warns(UserWarning) as notes:
        out = control_pipe("a road", context_image=context, seed=6, cfg_scale=1.0, **QUIET)
    messages = " ".join(str(n.message) for n in notes)
    assert "resized to the output's 64x48" in messages and "Context_Control" in messages
    assert control_pipe.last_request.prompts == ["Context_Control. a road"]
    assert out.shape == (1, 16, H // 8, W // 8)
    plain = control_pipe("Context_Control. a road", seed=6, cfg_scale=1.0, **QUIET)
    assert rel_err(out, plain) > 1e-3


def test_bad_control_inputs(control_pipe):
    with pytest.raises(ValueError, match="controlnet_id=5.* 3 Blockwise ControlNet"):
        control_pipe("x", blockwise_controlnet_inputs=[ControlNetInput(image=random_image(), controlnet_id=5)], **QUIET)
    with pytest.raises(ValueError, match="Inpaint ControlNet: give its ControlNetInput an inpaint_mask"):
        control_pipe("x", blockwise_controlnet_inputs=[ControlNetInput(image=random_image(), controlnet_id=1)], **QUIET)
    with pytest.raises(ValueError, match="inpaint_mask needs input_image"):
        control_pipe("x", inpaint_mask=random_image(), **QUIET)
    with pytest.raises(ValueError, match="has no image"):
        control_pipe("x", blockwise_controlnet_inputs=[ControlNetInput()], **QUIET)
    with pytest.raises(ValueError, match="end <= start"):
        control_pipe("x", blockwise_controlnet_inputs=[ControlNetInput(image=random_image(), start=0.2, end=0.5)],
                     **QUIET)
