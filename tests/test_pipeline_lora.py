"""LoRA through the pipeline (the seed's `pipe.load_lora`), and the Lightning schedule, against diffusers."""

import math

import pytest
import torch
from safetensors.torch import save_file

from conftest import rel_err
from lora_files import down_up_layout, peft_layout, random_pairs
from qistudio import FlowMatchScheduler
from qistudio.ops.packing import patchify, unpatchify
from tiny_models import reference_pipeline

H, W = 64, 96
QUIET = dict(progress_bar_cmd=lambda x: x, output_type="latent")
# diffusers' scheduler config for lightx2v's Qwen-Image-Lightning LoRAs: a fixed shift of 3, no terminal stretch.
LIGHTNING_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=math.log(3), max_image_seq_len=8192, max_shift=math.log(3),
    num_train_timesteps=1000, shift=1.0, shift_terminal=None, time_shift_type="exponential",
    use_dynamic_shifting=True,
)  # fmt: skip


def _noise(seed=7):
    return torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def pipe(tiny_pipe):
    yield tiny_pipe
    tiny_pipe.clear_lora()
    tiny_pipe.scheduler = FlowMatchScheduler()


@pytest.fixture(scope="module")
def lightning_file(tiny_pipe, tmp_path_factory):
    """A Lightning-style LoRA (lora_down / lora_up / alpha, as lightx2v ships) on the tiny DiT."""
    path = tmp_path_factory.mktemp("lora") / "Lightning-4steps.safetensors"
    save_file(down_up_layout(random_pairs(tiny_pipe.dit, seed=1)), str(path))
    return path


def test_lightning_lora_and_schedule_match_diffusers(tiny_repo, pipe, lightning_file):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = reference_pipeline(tiny_repo)
    ref.scheduler = FlowMatchEulerDiscreteScheduler(**LIGHTNING_SCHEDULER)
    ref.load_lora_weights(str(lightning_file))
    noise = _noise()
    with torch.no_grad():
        expected = ref(prompt="a lighthouse", height=H, width=W, num_inference_steps=4, true_cfg_scale=1.0,
                       latents=patchify(noise), output_type="latent").images
    pipe.scheduler = FlowMatchScheduler("Qwen-Image-Lightning")
    assert pipe.scheduler.sigmas(4, 24).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    name = pipe.load_lora(pipe.dit, str(lightning_file))
    assert name == "Lightning-4steps" and [info.name for info in pipe.list_loras()] == [name]
    got = pipe("a lighthouse", height=H, width=W, num_inference_steps=4, cfg_scale=1.0, noise=noise, **QUIET)
    assert rel_err(got, unpatchify(expected, H // 16, W // 16)) <= 1e-4


def test_scale_unload_fuse_never_reload_the_base(pipe, tmp_path):
    kwargs = dict(height=H, width=W, num_inference_steps=2, cfg_scale=3.0, negative_prompt="fog", noise=_noise(), **QUIET)
    base = pipe("a boat", **kwargs)
    weights_before = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    style = tmp_path / "style.safetensors"
    save_file(peft_layout(random_pairs(pipe.dit, seed=2), adapter="default"), str(style))  # DiffSynth's own layout
    detail = {k: v for k, v in down_up_layout(random_pairs(pipe.dit, seed=3), prefix="diffusion_model.").items()}

    pipe.load_lora(pipe.dit, str(style), alpha=0.8)
    pipe.load_lora(pipe.dit, state_dict=detail, name="detail")
    both = pipe("a boat", **kwargs)
    assert rel_err(both, base) > 1e-3
    pipe.set_lora_scale("detail", 0.0)
    style_only = pipe("a boat", **kwargs)
    pipe.unload_lora("detail")
    assert rel_err(pipe("a boat", **kwargs), style_only) <= 1e-6
    pipe.unload_lora()
    assert torch.equal(pipe("a boat", **kwargs), base)

    fused_name = pipe.load_lora(pipe.dit, str(style), alpha=0.8, hotload=False)  # the seed's "cold" load
    assert pipe.list_loras()[0].fused
    assert rel_err(pipe("a boat", **kwargs), style_only) <= 1e-5
    pipe.unload_lora(fused_name)
    assert all(torch.equal(v, weights_before[k]) for k, v in pipe.dit.state_dict().items())  # exact restore


def test_bad_lora_calls(pipe, tmp_path):
    with pytest.raises(ValueError, match="lora_config .* or as state_dict, not both or neither"):
        pipe.load_lora(pipe.dit)
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"foo.lora_A.weight": torch.zeros(4, 8), "foo.lora_B.weight": torch.zeros(8, 4)}, str(unrelated))
    with pytest.raises(ValueError, match="foo"):
        pipe.load_lora(pipe.dit, str(unrelated))
    with pytest.raises(ValueError, match="unknown scheduler template 'Turbo'"):
        FlowMatchScheduler("Turbo")
