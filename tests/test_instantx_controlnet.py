"""InstantX Qwen-Image ControlNets (Union, Inpainting; diffusers layout) through ControlNetInput.

Parity with diffusers' QwenImageControlNetPipeline and QwenImageControlNetInpaintPipeline at the latent level: the
tiny repository's DiT, VAE and text encoder on both sides, tiny random diffusers `QwenImageControlNetModel`s saved
with `save_pretrained` and loaded by our loader, the same noise, guidance with a negative prompt, 3 steps, float32
on the CPU. diffusers draws a sample from the VAE posterior of the control image where we take its mean; its VAE's
log-variance bias is pushed to -60 (std e^-15) so that both read the mean, as in test_pipeline_parity.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import rel_err
from qistudio import ControlNetInput, ModelConfig, QwenImagePipeline
from qistudio.models.controlnet import ControlNetConfig, QwenImageBlockwiseControlNet
from qistudio.models.instantx_controlnet import QwenImageInstantXControlNet, block_sample_index
from qistudio.ops.packing import patchify, unpatchify
from qistudio.weights.build import build_empty
from qistudio.weights.formats import CONTROLNET, INSTANTX_CONTROLNET_LAYOUT, detect_layout
from tiny_models import AXES, TEXT_DIM, _perturb, reference_pipeline

H, W = 48, 64  # latent 6 x 8, patch grid 3 x 4
STEPS = 3
PROMPT, NEGATIVE = "a stone bridge over a river", "blurry, low quality"
UNION, INPAINTING, BLOCKWISE = 0, 1, 2  # controlnet_id = load order
TOLERANCE = 1e-4


def reference_controlnet(num_layers: int, extra_channels: int = 0):
    from diffusers import QwenImageControlNetModel

    torch.manual_seed(0)
    net = QwenImageControlNetModel(num_layers=num_layers, attention_head_dim=32, num_attention_heads=2,
                                   joint_attention_dim=TEXT_DIM, axes_dims_rope=AXES,
                                   extra_condition_channels=extra_channels)
    return _perturb(net)  # controlnet_blocks and controlnet_x_embedder start at zero: give them weights


def random_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8))


def repaint_mask() -> Image.Image:
    mask = Image.new("L", (W, H))
    mask.paste(255, (8, 16, 40, 40))  # edges off the 16-pixel patch grid
    return mask


@pytest.fixture(scope="module")
def controlnet_dirs(tmp_path_factory):
    """Union-style (1 block for the DiT's 2: both DiT blocks take sample 0) and Inpainting (2 blocks, 4 more inputs)."""
    folder = tmp_path_factory.mktemp("instantx")
    reference_controlnet(1).save_pretrained(folder / "union")
    reference_controlnet(2, extra_channels=4).save_pretrained(folder / "inpainting")
    blockwise = _perturb(QwenImageBlockwiseControlNet(ControlNetConfig(num_layers=2, dim=64)))
    save_file({k: v.contiguous() for k, v in blockwise.state_dict().items()}, str(folder / "blockwise.safetensors"))
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_repo, controlnet_dirs):
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[
            *(ModelConfig(path=str(tiny_repo / name)) for name in ("transformer", "text_encoder", "vae")),
            ModelConfig(path=str(controlnet_dirs / "union")),
            ModelConfig(path=str(controlnet_dirs / "inpainting")),
            ModelConfig(path=str(controlnet_dirs / "blockwise.safetensors")),
        ],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )  # fmt: skip


@pytest.fixture(scope="module")
def base(tiny_repo):
    """diffusers' components over the tiny repository, its VAE posterior made deterministic."""
    ref = reference_pipeline(tiny_repo)
    with torch.no_grad():
        ref.vae.quant_conv.bias[16:] = -60.0
    return ref


def diffusers_pipeline(base, controlnet, inpaint: bool = False):
    import diffusers

    cls = diffusers.QwenImageControlNetInpaintPipeline if inpaint else diffusers.QwenImageControlNetPipeline
    return cls(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
               transformer=base.transformer, controlnet=controlnet)


def noise() -> torch.Tensor:
    return torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(7))


def ours(pipe, controls, **kwargs) -> torch.Tensor:
    return pipe(PROMPT, negative_prompt=NEGATIVE, cfg_scale=4.0, height=H, width=W, num_inference_steps=STEPS,
                noise=noise(), blockwise_controlnet_inputs=controls, output_type="latent",
                progress_bar_cmd=lambda x: x, **kwargs)


def theirs(ref, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        packed = ref(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, height=H, width=W,
                     num_inference_steps=STEPS, latents=patchify(noise()), output_type="latent", **kwargs).images
    return unpatchify(packed, H // 16, W // 16)


def test_loaded_by_layout_in_order(pipe, controlnet_dirs):
    from safetensors import safe_open

    with safe_open(str(controlnet_dirs / "union" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        layout = detect_layout(f.keys())
    assert layout.kind == CONTROLNET and layout.name == INSTANTX_CONTROLNET_LAYOUT
    union, inpainting, blockwise = pipe.controlnets
    assert isinstance(union, QwenImageInstantXControlNet) and isinstance(inpainting, QwenImageInstantXControlNet)
    assert isinstance(blockwise, QwenImageBlockwiseControlNet)
    assert (union.config.num_layers, union.config.additional_in_channels, union.config.axes_dim) == (1, 0, AXES)
    assert (inpainting.config.num_layers, inpainting.config.additional_in_channels) == (2, 4)


@pytest.mark.parametrize("layers, extra", [(5, 0), (6, 4)])
def test_full_size_layouts_build(layers, extra):
    """diffusers' QwenImageControlNetModel at the released width (Union: 5 blocks; Inpainting: 4 more inputs)."""
    from diffusers import QwenImageControlNetModel

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in QwenImageControlNetModel(
            num_layers=layers, extra_condition_channels=extra).state_dict().items()}
    layout = detect_layout(shapes)
    model = build_empty(layout.kind, {layout.key_map(k): v for k, v in shapes.items()}, None)
    assert layout.name == INSTANTX_CONTROLNET_LAYOUT and model.config.axes_dim == (16, 56, 56)
    assert {k: tuple(p.shape) for k, p in model.named_parameters()} == shapes


def test_block_sample_index_follows_diffusers_interval():
    assert [block_sample_index(i, 60, 5) for i in (0, 11, 12, 59)] == [0, 0, 1, 4]
    assert [block_sample_index(i, 60, 7) for i in (8, 9, 59)] == [0, 1, 6]  # interval ceil(60 / 7) = 9
    assert [block_sample_index(i, 2, 1) for i in (0, 1)] == [0, 0]


def test_union_matches_diffusers(pipe, base, controlnet_dirs):
    from diffusers import QwenImageControlNetModel

    controlnet = QwenImageControlNetModel.from_pretrained(controlnet_dirs / "union").eval()
    image = random_image(1)
    expected = theirs(diffusers_pipeline(base, controlnet), control_image=image, controlnet_conditioning_scale=0.8)
    got = ours(pipe, [ControlNetInput(image=image, scale=0.8, controlnet_id=UNION)])
    assert rel_err(got, expected) <= TOLERANCE
    plain = ours(pipe, None)
    assert rel_err(plain, expected) > 1e-2  # the ControlNet steers: the comparison above means something
    separate = ours(pipe, [ControlNetInput(image=image, scale=0.8, controlnet_id=UNION)], cfg_batch=False)
    assert rel_err(separate, got) <= 1e-5


def test_union_several_maps_and_windows_match_diffusers(pipe, base, controlnet_dirs):
    """diffusers' multi-ControlNet over one Union net; its control_guidance_start/end s, e = our 1 - start, 1 - end."""
    from diffusers import QwenImageControlNetModel, QwenImageMultiControlNetModel

    controlnet = QwenImageMultiControlNetModel([QwenImageControlNetModel.from_pretrained(controlnet_dirs / "union")])
    images = [random_image(2), random_image(3)]
    expected = theirs(diffusers_pipeline(base, controlnet.eval()), control_image=images,
                      controlnet_conditioning_scale=[0.6, 0.9], control_guidance_start=[0.0, 0.4],
                      control_guidance_end=[0.5, 1.0])
    controls = [ControlNetInput(image=images[0], scale=0.6, start=1.0, end=0.5, controlnet_id=UNION),
                ControlNetInput(image=images[1], scale=0.9, start=0.6, end=0.0, controlnet_id=UNION)]
    # Step i spans the progress [1 - (i+1)/3, 1 - i/3]: the first input acts at step 0 only, the second at step 2
    # only. DiffSynth's rule (the Blockwise one: progress 1, 0.5, 0 at the steps) would also take step 1 for both.
    assert [[c.active_span(i, STEPS) for i in range(STEPS)] for c in controls] == [[1, 0, 0], [0, 0, 1]]
    assert [[c.active(i, STEPS) for i in range(STEPS)] for c in controls] == [[1, 1, 0], [0, 1, 1]]
    assert rel_err(ours(pipe, controls), expected) <= TOLERANCE


def test_inpainting_matches_diffusers(pipe, base, controlnet_dirs):
    from diffusers import QwenImageControlNetModel

    controlnet = QwenImageControlNetModel.from_pretrained(controlnet_dirs / "inpainting").eval()
    image, mask = random_image(4), repaint_mask()
    expected = theirs(diffusers_pipeline(base, controlnet, inpaint=True), control_image=image, control_mask=mask,
                      controlnet_conditioning_scale=1.0)
    got = ours(pipe, [ControlNetInput(image=image, inpaint_mask=mask, controlnet_id=INPAINTING)])
    assert rel_err(got, expected) <= TOLERANCE


def test_bad_inputs_say_what_is_loaded(pipe):
    with pytest.raises(ValueError, match=r"controlnet_id=7.* 3 ControlNet\(s\) \(1 Blockwise, 2 InstantX\)"):
        ours(pipe, [ControlNetInput(image=random_image(5), controlnet_id=7)])
    with pytest.raises(ValueError, match="Inpaint ControlNet: give its ControlNetInput an inpaint_mask"):
        ours(pipe, [ControlNetInput(image=random_image(5), controlnet_id=INPAINTING)])
