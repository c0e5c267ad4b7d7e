"""EliGen: entity prompts and masks - the attention structure, the inputs' checks, and the pipeline path."""

import pytest
import torch
from PIL import Image

from conftest import rel_err
from qistudio.conditioning.eligen import MAX_ENTITIES, entity_mask_parts, mask_to_tokens
from qistudio.ops.attention import attention
from qistudio.ops.split_attention import SplitMask
from qistudio.conditioning.sequence import build_sequence
from qistudio.models.text_encoder import TextStates
from qistudio.ops.rope import ImageGrid, rope_tables, text_positions
from qistudio.request import build_request

QUIET = dict(progress_bar_cmd=lambda x: x, output_type="latent", height=64, width=64, num_inference_steps=2)


def box_mask(size, box):
    """A white box on black, size (width, height), box (left, top, right, bottom)."""
    mask = Image.new("RGB", size)
    mask.paste((255, 255, 255), box)
    return mask


def test_mask_to_tokens_marks_any_covered_patch():
    mask = box_mask((64, 64), (0, 0, 24, 8))  # latent 8x8, patches 4x4: columns 0..1.5 of the top patch row
    tokens = mask_to_tokens(mask, 8, 8).reshape(4, 4)
    assert tokens[0, :2].all() and not tokens[0, 2:].any() and not tokens[1:].any()


def test_attention_structure():
    """Entity text <-> its region only; segments blind to each other; global sees all; padding seen by none."""
    regions = torch.tensor([[True, True, False, False], [False, True, True, False]])
    parts = entity_mask_parts(num_image=4, num_target=4, text_length=7, segments=[2, 1, 3], token_masks=regions,
                              device="cpu")  # fmt: skip
    mask = SplitMask(4, parts[0][None], parts[1][None]).dense()[0, 0]
    image, e1, e2, glob, pad = slice(0, 4), slice(4, 6), slice(6, 7), slice(7, 10), slice(10, 11)
    assert mask[image, image].all()
    assert torch.equal(mask[e1, image], regions[0].expand(2, 4)) and torch.equal(mask[image, e1], regions[0][:, None].expand(4, 2))
    assert torch.equal(mask[e2, image], regions[1].expand(1, 4))
    assert mask[glob, image].all() and mask[image, glob].all()
    assert mask[e1, e1].all() and not mask[e1, e2].any() and not mask[e1, glob].any() and not mask[glob, e2].any()
    assert not mask[pad].any() and not mask[:, pad].any()


def test_entity_text_restarts_positions_at_the_offset():
    target = ImageGrid(0, 4, 6)
    text = TextStates(torch.zeros(1, 8, 64), [7], segments=[[3, 4]])
    seq = build_sequence(target, [[]], text, (8, 12, 12), entity_token_masks=torch.ones(1, 24, dtype=torch.bool))
    expected = torch.cat([text_positions(3, 3), text_positions(3, 4), text_positions(7, 1)])
    assert torch.allclose(seq.rotary.text[0], rope_tables(expected, (8, 12, 12)))
    assert seq.attention_mask.dense().shape == (1, 1, 32, 32) and seq.text_lengths is None


def test_split_attention_equals_dense_masked_attention():
    """The split (image block through the fused kernel, text merged by log-sum-exp) is dense masked attention."""
    g = torch.Generator().manual_seed(0)
    regions = torch.rand(3, 20, generator=g) > 0.5
    rows = [entity_mask_parts(20, 20, 9, segs, regions, "cpu") for segs in ([2, 3, 1, 2], [3, 3, 1, 1])]
    mask = SplitMask(20, torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
    q, k, v = (torch.randn(2, 29, 2, 16, generator=g) for _ in range(3))
    dense = attention(q, k, v, mask=mask.dense())
    split = attention(q, k, v, mask=mask)
    valid = torch.ones(2, 29, dtype=torch.bool)
    valid[:, 28] = False  # the padding query of both rows (8 of 9 text tokens used): never read
    assert rel_err(split[valid], dense[valid]) <= 1e-6


def test_bad_entities_fail_before_any_model_runs():
    mask = box_mask((64, 64), (0, 0, 32, 32))
    with pytest.raises(ValueError, match="2 prompts but eligen_entity_masks has 1 masks"):
        build_request("x", height=64, width=64, eligen_entity_prompts=["a", "b"], eligen_entity_masks=[mask])
    with pytest.raises(ValueError, match="entity mask 0 .* is empty"):
        build_request("x", height=64, width=64, eligen_entity_prompts=["a"],
                      eligen_entity_masks=[Image.new("RGB", (64, 64))])
    with pytest.raises(ValueError, match=f"at most {MAX_ENTITIES}"):
        build_request("x", height=64, width=64, eligen_entity_prompts=["a"] * 17, eligen_entity_masks=[mask] * 17)
    with pytest.raises(ValueError, match="not supported"):
        build_request("x", edit_image=mask, eligen_entity_prompts=["a"], eligen_entity_masks=[mask])


def test_pipeline_with_entities(tiny_pipe):
    """Runs with and without guidance batching alike; a row alone equals it in a batch; masks of any size."""
    masks = [box_mask((128, 128), (0, 0, 64, 128)), box_mask((40, 40), (20, 0, 40, 40))]  # any size, resized
    entities = dict(eligen_entity_prompts=["a red fox", "a snowy pine tree under the moon"],
                    eligen_entity_masks=masks, negative_prompt="blur", cfg_scale=3.0, seed=2)
    plain = tiny_pipe("a winter scene", negative_prompt="blur", cfg_scale=3.0, seed=2, **QUIET)
    batched = tiny_pipe("a winter scene", **entities, **QUIET)
    separate = tiny_pipe("a winter scene", cfg_batch=False, **entities, **QUIET)
    assert rel_err(batched, separate) <= 1e-5 and rel_err(batched, plain) > 1e-3
    on_negative = tiny_pipe("a winter scene", eligen_enable_on_negative=True, **entities, **QUIET)
    assert rel_err(on_negative, batched) > 1e-4
    two = tiny_pipe(["a winter scene", "a night in the forest with many lanterns"], **entities, **QUIET)
    assert rel_err(two[:1], batched) <= 1e-5

