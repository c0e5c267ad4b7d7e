"""LoRAs on the Qwen-Image 2.1 DiT in the layouts people publish (diffusers/PEFT, DiffSynth, ComfyUI, kohya): the
output equals the reference DiT with the update merged by hand; unloading restores the weights exactly."""

import pytest
import torch

from conftest import rel_err
from lora_files import down_up_layout, kohya_layout, merged, peft_layout, random_pairs
from qistudio import lora
from qistudio.models.layout21 import ImageBlock, JointLayout
from qistudio.weights.build import load_model
from tiny_qwen21 import random_inputs, reference_dit21, reference_inputs, save

LAYOUT = JointLayout((5, ImageBlock(2, 4), 6), ImageBlock(4, 4))
# Every kind of linear the 2.1 DiT has: attention, the SwiGLU MLP, the shared modulation, the input/output layers.
TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.1.attn.to_v",
           "transformer_blocks.1.attn.to_out.0", "transformer_blocks.0.img_mlp.proj",
           "transformer_blocks.0.img_mlp.gate_layer", "transformer_blocks.1.img_mlp.out", "modulation.1", "img_in",
           "txt_in.in_layer", "txt_in.out_layer", "proj_out", "norm_out.linear",
           "time_text_embed.timestep_embedder.linear_1")
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def reference():
    return reference_dit21()


@pytest.fixture
def ours(reference, tmp_path):
    _, model = load_model(sorted(save(reference, tmp_path).glob("*.safetensors")), dtype=torch.float32)
    return model


def _forward(model, reference_form: bool) -> torch.Tensor:
    text, condition, target = random_inputs(LAYOUT)
    timestep = torch.tensor([0.6, 0.6])
    with torch.no_grad():
        if reference_form:
            return model(timestep=timestep, **reference_inputs(LAYOUT, text, condition, target))[0][:, -16:]
        return model(target, timestep, model.prefill(text, condition, LAYOUT))


@pytest.mark.parametrize("layout", [
    lambda pairs: peft_layout(pairs, prefix="transformer.", alpha=None),  # diffusers' save_lora_weights
    lambda pairs: peft_layout(pairs, adapter="default"),  # DiffSynth-Studio's trainer
    lambda pairs: down_up_layout(pairs, prefix="diffusion_model."),  # ComfyUI
    lambda pairs: kohya_layout(pairs),  # kohya / musubi-tuner
], ids=["diffusers", "diffsynth", "comfyui", "kohya"])
def test_lora_equals_the_reference_with_merged_weights(reference, ours, layout):
    pairs = random_pairs(reference, TARGETS, RANK)
    state = layout(pairs)
    factor = 0.7 * (ALPHA / RANK if any(k.endswith(".alpha") for k in state) else 1.0)
    merged_reference = reference_dit21()
    merged_reference.load_state_dict(merged(reference, pairs, factor))
    before = _forward(ours, False)
    name = lora.load_lora(ours, state, alpha=0.7)
    assert rel_err(_forward(ours, False), _forward(merged_reference, True)) <= 1e-5
    weights = {k: v.clone() for k, v in ours.state_dict().items()}
    lora.unload_lora(ours, name)
    assert torch.equal(_forward(ours, False), before)
    assert all(torch.equal(v, weights[k]) for k, v in ours.state_dict().items())


def test_fused_lora_unfuses_exactly(reference, ours):
    pairs = random_pairs(reference, TARGETS, RANK, seed=1)
    original = {k: v.clone() for k, v in ours.state_dict().items()}
    hooked_name = lora.load_lora(ours, peft_layout(pairs), alpha=1.0)
    hooked = _forward(ours, False)
    lora.unload_lora(ours, hooked_name)
    fused_name = lora.load_lora(ours, peft_layout(pairs), alpha=1.0, fuse=True)
    assert rel_err(_forward(ours, False), hooked) <= 1e-5
    lora.unload_lora(ours, fused_name)
    assert all(torch.equal(v, original[k]) for k, v in ours.state_dict().items())
