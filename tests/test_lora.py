"""LoRA engine: every layout equals merging W + scale * alpha/rank * B @ A by hand; stacking, scales, exact unfuse."""

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import rel_err
from lora_files import (ALPHA, RANK, TARGETS, Inputs, down_up_layout, kohya_layout, merged, our_dit, peft_layout,
                        random_pairs)
from qistudio.lora import (LoRAError, fuse_lora, list_loras, load_lora, lora_tensors, set_lora_scale, unfuse_lora,
                           unload_lora)
from tiny_models import reference_dit

FILE_SCALE = ALPHA / RANK  # 2: the file's alpha / rank


@pytest.fixture(scope="module")
def reference():
    return reference_dit()


@pytest.fixture
def dit(reference):
    return our_dit(reference)


@pytest.fixture(scope="module")
def inputs():
    return Inputs()


def _hand_merged_output(dit, pairs, factor, inputs):
    expected = our_dit(dit)
    expected.load_state_dict(merged(dit, pairs, factor))
    return inputs.ours(expected)


LAYOUTS = {
    "peft": lambda p: peft_layout(p),
    "peft_no_alpha": lambda p: peft_layout(p, alpha=None),
    "diffsynth_default": lambda p: peft_layout(p, adapter="default"),
    "diffusers_transformer_prefix": lambda p: peft_layout(p, prefix="transformer."),
    "peft_base_model": lambda p: peft_layout(p, prefix="base_model.model.", adapter="default"),
    "comfyui_diffusion_model": lambda p: peft_layout(p, prefix="diffusion_model."),
    "comfyui_model_diffusion_model": lambda p: down_up_layout(p, prefix="model.diffusion_model."),
    "lightx2v_down_up": lambda p: down_up_layout(p),
    "kohya": lambda p: kohya_layout(p),
    "simpletuner_lycoris": lambda p: kohya_layout(p, prefix="lycoris_"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_equals_merging_by_hand(dit, inputs, tmp_path, layout):
    pairs = random_pairs(dit)
    path = tmp_path / f"{layout}.safetensors"
    save_file(LAYOUTS[layout](pairs), path)
    base = inputs.ours(dit)
    name = load_lora(dit, str(path), alpha=0.7)
    assert name == layout and [info.num_layers for info in list_loras(dit)] == [len(TARGETS)]
    got = inputs.ours(dit)
    factor = 0.7 * (1.0 if layout == "peft_no_alpha" else FILE_SCALE)
    assert rel_err(got, _hand_merged_output(dit, pairs, factor, inputs)) <= 1e-5
    assert rel_err(got, base) > 1e-2  # the LoRA does change the output


def test_peft_adapter_config_supplies_alpha(dit, inputs, tmp_path):
    pairs = random_pairs(dit)
    folder = tmp_path / "peft_run"
    folder.mkdir()
    save_file(peft_layout(pairs, prefix="base_model.model.", alpha=None), folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 16, "use_rslora": False}))
    load_lora(dit, folder)
    assert rel_err(inputs.ours(dit), _hand_merged_output(dit, pairs, 16 / RANK, inputs)) <= 1e-5


def test_lightx2v_dense_deltas(dit, inputs):
    """lightx2v files may carry full deltas: `.diff` added to a weight and `.diff_b` to a bias."""
    pairs = random_pairs(dit, targets=TARGETS[:3])
    state = down_up_layout(pairs)
    g = torch.Generator().manual_seed(5)
    diff = torch.randn(dit.proj_out.weight.shape, generator=g) * 0.05
    diff_b = torch.randn(dit.transformer_blocks[0].attn.to_q.bias.shape, generator=g) * 0.05
    state["proj_out.diff"] = diff
    state["transformer_blocks.0.attn.to_q.diff_b"] = diff_b
    load_lora(dit, state, alpha=0.5)
    expected_state = merged(dit, pairs, 0.5 * FILE_SCALE)
    expected_state["proj_out.weight"] += 0.5 * diff
    expected_state["transformer_blocks.0.attn.to_q.bias"] += 0.5 * diff_b
    expected = our_dit(dit)
    expected.load_state_dict(expected_state)
    assert rel_err(inputs.ours(dit), inputs.ours(expected)) <= 1e-5


def test_a_dense_delta_on_a_norm_works_fused_only(dit, inputs):
    original = {k: v.clone() for k, v in dit.state_dict().items()}
    state = {"transformer_blocks.0.attn.norm_q.diff": torch.full((32,), 0.25)}
    with pytest.raises(LoRAError, match="RMSNorm is not a linear layer.*fuse=True"):
        load_lora(dit, state)
    load_lora(dit, state, name="norm", fuse=True)
    norm_q, before = dit.transformer_blocks[0].attn.norm_q, original["transformer_blocks.0.attn.norm_q.weight"]
    assert torch.equal(norm_q.weight, before + 0.25)
    with pytest.raises(LoRAError, match="not linear.*fused only"):
        unfuse_lora(dit, "norm")
    set_lora_scale(dit, "norm", 2.0)
    assert torch.allclose(norm_q.weight, before + 0.5)
    unload_lora(dit)
    assert all(torch.equal(v, original[k]) for k, v in dit.state_dict().items())


def test_loha_and_lokr(dit, inputs):
    g = torch.Generator().manual_seed(7)
    rank = 4
    q = "transformer_blocks.0.attn.to_q"  # (64, 64)
    mlp = "transformer_blocks.0.img_mlp.net.0.proj"  # (256, 64)
    shapes = {"hada_w1_a": (64, rank), "hada_w1_b": (rank, 64), "hada_w2_a": (64, rank), "hada_w2_b": (rank, 64)}
    loha = {n: torch.randn(s, generator=g) * 0.2 for n, s in shapes.items()}
    lokr = {"lokr_w1": torch.randn(4, 4, generator=g) * 0.2, "lokr_w2_a": torch.randn(64, rank, generator=g) * 0.2,
            "lokr_w2_b": torch.randn(rank, 16, generator=g) * 0.2}
    state = {f"lycoris_{q.replace('.', '_')}.{k}": v for k, v in loha.items()}
    state[f"lycoris_{q.replace('.', '_')}.alpha"] = torch.tensor(2.0)
    state.update({f"lora_unet_{mlp.replace('.', '_')}.{k}": v for k, v in lokr.items()})
    state[f"lora_unet_{mlp.replace('.', '_')}.alpha"] = torch.tensor(8.0)
    load_lora(dit, state, alpha=0.6)

    expected_state = {k: v.clone() for k, v in dit.state_dict().items()}
    loha_delta = (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"]) * (2.0 / rank)
    lokr_delta = torch.kron(lokr["lokr_w1"], lokr["lokr_w2_a"] @ lokr["lokr_w2_b"]) * (8.0 / rank)
    expected_state[f"{q}.weight"] += 0.6 * loha_delta
    expected_state[f"{mlp}.weight"] += 0.6 * lokr_delta
    expected = our_dit(dit)
    expected.load_state_dict(expected_state)
    assert rel_err(inputs.ours(dit), inputs.ours(expected)) <= 1e-5


def test_two_stacked_loras_each_with_its_scale(dit, inputs):
    first, second = random_pairs(dit, seed=1), random_pairs(dit, targets=TARGETS[::2], seed=2)
    load_lora(dit, peft_layout(first), alpha=0.8, name="first")
    load_lora(dit, kohya_layout(second), alpha=-0.3, name="second")
    state = merged(dit, first, 0.8 * FILE_SCALE)
    for name, (down, up) in second.items():
        state[f"{name}.weight"] += -0.3 * FILE_SCALE * (up @ down)
    expected = our_dit(dit)
    expected.load_state_dict(state)
    assert rel_err(inputs.ours(dit), inputs.ours(expected)) <= 1e-5
    assert [(i.name, i.scale) for i in list_loras(dit)] == [("first", 0.8), ("second", -0.3)]

    set_lora_scale(dit, "second", 0.0)  # scale 0 switches one off; the other stays
    assert rel_err(inputs.ours(dit), _hand_merged_output(dit, first, 0.8 * FILE_SCALE, inputs)) <= 1e-5


def test_scale_zero_and_unload_equal_no_lora_and_keep_the_base_untouched(dit, inputs):
    base = inputs.ours(dit)
    params = dict(dit.named_parameters())
    keys = list(dit.state_dict())
    values = {k: v.clone() for k, v in dit.state_dict().items()}
    name = load_lora(dit, peft_layout(random_pairs(dit)))
    assert list(dit.state_dict()) == keys  # nothing added to the state dict
    assert all(p is params[n] for n, p in dit.named_parameters())
    assert not torch.equal(inputs.ours(dit), base)
    set_lora_scale(dit, name, 0)
    assert torch.equal(inputs.ours(dit), base)
    set_lora_scale(dit, name, 1.5)
    unload_lora(dit, name)
    assert torch.equal(inputs.ours(dit), base)
    assert list_loras(dit) == [] and not dit.transformer_blocks[0].attn.to_q._forward_hooks
    assert all(torch.equal(v, values[k]) for k, v in dit.state_dict().items())


def test_fuse_equals_unfused_and_unfuse_restores_float32_exactly(dit, inputs):
    original = {k: v.clone() for k, v in dit.state_dict().items()}
    params = dict(dit.named_parameters())
    load_lora(dit, peft_layout(random_pairs(dit, seed=1)), alpha=0.9, name="a")
    unfused = inputs.ours(dit)
    fuse_lora(dit, "a")
    assert list_loras(dit)[0].fused
    assert not torch.equal(dit.img_in.weight, original["img_in.weight"])
    assert rel_err(inputs.ours(dit), unfused) <= 1e-5
    unfuse_lora(dit, "a")
    assert all(torch.equal(v, original[k]) for k, v in dit.state_dict().items())
    assert all(p is params[n] for n, p in dit.named_parameters())
    assert rel_err(inputs.ours(dit), unfused) <= 1e-6  # back to the hook path


def test_fuse_in_bfloat16_unfuses_bit_for_bit(reference, inputs):
    dit = our_dit(reference, torch.bfloat16)
    original = {k: v.clone() for k, v in dit.state_dict().items()}
    load_lora(dit, kohya_layout(random_pairs(dit, seed=4)), name="a", fuse=True)
    fused_output = inputs.ours(dit, torch.bfloat16)
    unfuse_lora(dit, "a")
    hook_output = inputs.ours(dit, torch.bfloat16)
    assert rel_err(fused_output, hook_output) <= 2e-2  # the same LoRA, within bf16 rounding of the two paths
    assert all(torch.equal(v, original[k]) for k, v in dit.state_dict().items())


def test_stacked_fused_loras_unfuse_out_of_order(dit, inputs):
    original = {k: v.clone() for k, v in dit.state_dict().items()}
    load_lora(dit, peft_layout(random_pairs(dit, seed=1)), name="a", fuse=True)
    load_lora(dit, peft_layout(random_pairs(dit, targets=TARGETS[:5], seed=2)), name="b", fuse=True)
    set_lora_scale(dit, "b", 0.25)  # re-fused at the new scale
    unfuse_lora(dit, "a")  # below "b" in every shared layer
    only_b = {k: v.clone() for k, v in dit.state_dict().items()}
    unload_lora(dit)
    assert all(torch.equal(v, original[k]) for k, v in dit.state_dict().items())
    load_lora(dit, peft_layout(random_pairs(dit, targets=TARGETS[:5], seed=2)), name="b", alpha=0.25, fuse=True)
    assert all(torch.equal(v, only_b[k]) for k, v in dit.state_dict().items())


def test_unfuse_after_the_weight_changed_warns(dit):
    load_lora(dit, peft_layout(random_pairs(dit)), name="a", fuse=True)
    with torch.no_grad():
        dit.img_in.weight.mul_(1.0)  # an in-place write, as a training step or load_state_dict would do
    with pytest.warns(UserWarning, match="changed after the LoRA 'a' was fused"):
        unfuse_lora(dit, "a")


def test_gradients_flow_through_the_lora(dit, inputs):
    name = load_lora(dit, peft_layout(random_pairs(dit)))
    tensors = lora_tensors(dit, name)
    for tensor in tensors:
        tensor.requires_grad_(True)
    tokens = inputs.tokens.clone().requires_grad_(True)
    from qistudio.ops.rope import ImageGrid, qwen_rotary
    from tiny_models import AXES

    rotary = qwen_rotary([ImageGrid(0, inputs.h, inputs.w)], inputs.text_len, axes_dim=AXES)
    dit(tokens, inputs.text, inputs.sigma, rotary).square().mean().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tensors)


def test_no_matching_key_raises_naming_the_keys(dit):
    state = {"unet.mid_block.attn.lora_A.weight": torch.zeros(4, 8),
             "unet.mid_block.attn.lora_B.weight": torch.zeros(8, 4)}
    with pytest.raises(LoRAError, match=r"none of its 2 tensors(.|\n)*unet\.mid_block\.attn\.lora_A\.weight"):
        load_lora(dit, state)
    assert list_loras(dit) == []


def test_partial_match_warns_with_counts(dit):
    state = peft_layout(random_pairs(dit, targets=TARGETS[:2]))
    state["single_transformer_blocks.0.proj_mlp.lora_A.weight"] = torch.zeros(4, 8)
    state["single_transformer_blocks.0.proj_mlp.lora_B.weight"] = torch.zeros(8, 4)
    with pytest.warns(UserWarning, match=r"applied to 2 layers; 2 of its 8 tensors match no layer"):
        load_lora(dit, state)


def test_user_errors_are_clear(dit):
    pairs = random_pairs(dit, targets=TARGETS[:1])
    wrong = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
             "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(LoRAError, match=r"does not fit the model(.|\n)*delta is \[64, 32\], the weight \[64, 64\]"):
        load_lora(dit, wrong)
    with pytest.raises(LoRAError, match="half a LoRA pair; its lora_B/lora_up tensor is missing"):
        load_lora(dit, {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64)})
    load_lora(dit, peft_layout(pairs), name="style")
    with pytest.raises(LoRAError, match="named 'style' is already loaded"):
        load_lora(dit, peft_layout(pairs), name="style")
    with pytest.raises(LoRAError, match=r"no LoRA named 'other'.*loaded: 'style'"):
        set_lora_scale(dit, "other", 1.0)
    with pytest.raises(ValueError, match="finite number, got nan"):
        set_lora_scale(dit, "style", float("nan"))
    with pytest.raises(FileNotFoundError, match="no such LoRA file"):
        load_lora(dit, "/nonexistent/lora.safetensors")


def test_a_model_config_and_default_names(dit, inputs, tmp_path):
    from qistudio import ModelConfig

    pairs = random_pairs(dit)
    path = tmp_path / "Qwen-Image-Lightning-8steps.safetensors"
    save_file(down_up_layout(pairs), path)
    assert load_lora(dit, ModelConfig(path=str(path)), alpha=0.5) == "Qwen-Image-Lightning-8steps"
    assert load_lora(dit, str(path), alpha=0.5) == "Qwen-Image-Lightning-8steps_2"  # the same file twice: stacked
    assert rel_err(inputs.ours(dit), _hand_merged_output(dit, pairs, 1.0 * FILE_SCALE, inputs)) <= 1e-5


def test_the_lora_package_imports_only_models_and_weights():
    from test_architecture import PACKAGE, _imports

    above = ("qistudio.pipeline", "qistudio.components", "qistudio.conditioning", "qistudio.sampling", "qistudio.cli")
    for path in (PACKAGE / "lora").glob("*.py"):
        assert not [n for n in _imports(path) if n.startswith(above)], path.name
