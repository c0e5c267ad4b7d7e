"""Qwen-Image 2.1 DiT parity: diffusers' QwenImage21Transformer2DModel (tiny, random, saved with save_pretrained)
against ours loaded from those files, text-to-image and with condition images, with the reference's KV cache and
without causal_condition."""

import pytest
import torch

from conftest import rel_err
from qistudio.models.dit21 import QwenImage21DiT
from qistudio.models.layout21 import ImageBlock, JointLayout
from qistudio.weights.build import load_model
from tiny_qwen21 import random_inputs, reference_dit21, reference_inputs, save

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference():
    return reference_dit21()


@pytest.fixture(scope="module")
def ours(reference, tmp_path_factory):
    folder = save(reference, tmp_path_factory.mktemp("qwen21_dit"), max_shard_size="200KB")
    kind, model = load_model(sorted(folder.glob("*.safetensors")), dtype=torch.float32)
    assert kind == "dit" and isinstance(model, QwenImage21DiT)
    return model


TEXT_TO_IMAGE = JointLayout((11,), ImageBlock(4, 6))
# Two condition images with text before, between and after them; the second one smaller, with an odd side.
EDIT = JointLayout((5, ImageBlock(4, 6), 3, ImageBlock(2, 6), 7), ImageBlock(6, 4))


@pytest.mark.parametrize("layout", [TEXT_TO_IMAGE, EDIT], ids=["text-to-image", "two-condition-images"])
def test_forward_matches_diffusers(reference, ours, layout):
    text, condition, target = random_inputs(layout)
    timestep = torch.tensor([0.73, 0.73])
    with torch.no_grad():
        expected = reference(timestep=timestep, **reference_inputs(layout, text, condition, target))[0]
        got = ours(target, timestep, ours.prefill(text, condition, layout))
    assert rel_err(got, expected[:, -layout.target.num_tokens:]) <= TOLERANCE


def test_one_prefill_serves_every_step_as_the_reference_cache(reference, ours):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    text, condition, target = random_inputs(EDIT)
    cache = QwenImage21KVCache(len(reference.transformer_blocks))
    with torch.no_grad():
        ours_cache = ours.prefill(text, condition, EDIT)
        for step, (sigma, noise_scale) in enumerate([(0.9, 1.0), (0.4, 0.5), (0.05, 0.1)]):
            tokens, timestep = target * noise_scale, torch.full((2,), sigma)
            mode = "extract" if step == 0 else "cached"
            expected = reference(timestep=timestep, kv_cache=cache, kv_cache_mode=mode,
                                 **reference_inputs(EDIT, text, condition, tokens))[0]
            got = ours(tokens, timestep, ours_cache)
            assert rel_err(got, expected[:, -EDIT.target.num_tokens:]) <= TOLERANCE


def test_without_causal_condition_the_prefix_follows_the_timestep(tmp_path):
    reference = reference_dit21(causal_condition=False)
    folder = save(reference, tmp_path)
    _, ours = load_model(sorted(folder.glob("*.safetensors")), dtype=torch.float32)
    assert not ours.config.causal_condition
    text, condition, target = random_inputs(EDIT)
    timestep = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        expected = reference(timestep=timestep, **reference_inputs(EDIT, text, condition, target))[0]
        got = ours(target, timestep, ours.prefill(text, condition, EDIT, timestep[:1]))
        with pytest.raises(ValueError, match="causal_condition=False"):
            ours.prefill(text, condition, EDIT)
    assert rel_err(got, expected[:, -EDIT.target.num_tokens:]) <= TOLERANCE


def test_rows_of_a_batch_are_independent(ours):
    text, condition, target = random_inputs(EDIT, batch=3)
    timestep = torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        cache = ours.prefill(text, condition, EDIT)
        together = ours(target, timestep, cache)
        for row in range(3):
            alone = ours(target[row:row + 1], timestep[row:row + 1], cache)
            assert rel_err(together[row:row + 1], alone) <= TOLERANCE


def test_layout_mismatches_are_named(ours):
    text, condition, target = random_inputs(EDIT)
    with torch.no_grad(), pytest.raises(ValueError, match="text states"):
        ours.prefill(text[:, 1:], condition, EDIT)
    with torch.no_grad(), pytest.raises(ValueError, match="target tokens"):
        ours(target[:, 1:], torch.ones(2), ours.prefill(text, condition, EDIT))


def test_regional_compile_equals_eager(reference, tmp_path):
    from qistudio.compile import compile_repeated_blocks

    _, dit = load_model(sorted(save(reference, tmp_path).glob("*.safetensors")), dtype=torch.float32)
    text, condition, target = random_inputs(EDIT)
    timestep = torch.tensor([0.6, 0.6])
    with torch.no_grad():
        eager = dit(target, timestep, dit.prefill(text, condition, EDIT))
        # fullgraph=True: a graph break in the prefix or the target pass would be an error
        assert compile_repeated_blocks(dit, backend="aot_eager") == 2
        compiled = dit(target, timestep, dit.prefill(text, condition, EDIT))
    assert rel_err(compiled, eager) <= 1e-6
