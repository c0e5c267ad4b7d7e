"""LoRA export and agreement with diffusers: what we write loads in diffusers and gives our output."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import rel_err
from lora_files import ALPHA, RANK, TARGETS, Inputs, kohya_layout, merged, our_dit, peft_layout, random_pairs
from qistudio.lora import FORMATS, LoRAError, convert_lora_file, convert_lora_state_dict, load_lora, unload_lora
from tiny_models import reference_dit


def _diffusers_output(path, inputs, scale=1.0):
    """diffusers' QwenImagePipeline.load_lora_weights on a fresh reference transformer, then one call."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    transformer = reference_dit()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                             tokenizer=None, transformer=transformer)
    pipe.load_lora_weights(str(path), adapter_name="lora")
    pipe.set_adapters(["lora"], [scale])
    return inputs.diffusers(transformer)


@pytest.mark.parametrize("to", FORMATS)
def test_export_round_trip_keeps_the_output(reference, inputs, tmp_path, to):
    dit = our_dit(reference)
    source = tmp_path / "kohya.safetensors"
    save_file(kohya_layout(random_pairs(dit)), source)
    load_lora(dit, source, alpha=0.6, name="original")
    expected = inputs.ours(dit)
    unload_lora(dit)

    written = convert_lora_file(source, tmp_path / "out" / f"{to}.safetensors", to=to)
    assert sorted(os.listdir(written.parent)) == [f"{to}.safetensors"]  # no temporary file left behind
    keys = list(load_file(written))
    assert len(keys) == 2 * len(TARGETS) + (len(TARGETS) if to == "comfyui" else 0)
    if to == "diffsynth":
        assert all(k.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for k in keys)
        assert "transformer_blocks.0.attn.to_q.lora_A.default.weight" in keys
    else:
        assert all(k.startswith({"diffusers": "transformer.", "comfyui": "diffusion_model."}[to]) for k in keys)
    assert any(k.endswith(".alpha") for k in keys) == (to == "comfyui")
    load_lora(dit, written, alpha=0.6)
    assert rel_err(inputs.ours(dit), expected) <= 1e-6


@pytest.mark.parametrize("to", ["diffusers", "comfyui"])
def test_diffusers_loads_our_export_and_agrees(reference, inputs, tmp_path, to):
    dit = our_dit(reference)
    pairs = random_pairs(dit)
    source = tmp_path / "diffsynth_trained.safetensors"  # DiffSynth's own trainer output, with an alpha
    save_file(peft_layout(pairs, adapter="default"), source)
    exported = convert_lora_file(source, tmp_path / f"{to}.safetensors", to=to)
    ours_name = load_lora(dit, source, alpha=0.75)
    ours = inputs.ours(dit)
    hand = our_dit(reference)
    hand.load_state_dict(merged(hand, pairs, 0.75 * ALPHA / RANK))
    assert rel_err(ours, inputs.ours(hand)) <= 1e-5
    assert rel_err(ours, _diffusers_output(exported, inputs, scale=0.75)) <= 1e-4
    assert ours_name == "diffsynth_trained"


def test_diffusers_agrees_on_a_kohya_file(reference, inputs, tmp_path):
    dit = our_dit(reference)
    path = tmp_path / "kohya.safetensors"
    save_file(kohya_layout(random_pairs(dit, seed=9)), path)
    load_lora(dit, path)
    assert rel_err(inputs.ours(dit), _diffusers_output(path, inputs)) <= 1e-4


def test_comfyui_keeps_lycoris_and_dense_deltas_others_refuse(reference, tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {f"lycoris_img_in.hada_w{i}_{ab}": torch.randn(*((64, 2) if ab == "a" else (2, 64)), generator=g)
             for i in (1, 2) for ab in "ab"}
    state["lycoris_img_in.alpha"] = torch.tensor(1.0)
    state["proj_out.diff_b"] = torch.randn(64, generator=g)
    out = convert_lora_state_dict(state, "comfyui")
    assert set(out) == {f"diffusion_model.img_in.hada_w{i}_{ab}" for i in (1, 2) for ab in "ab"} | {
        "diffusion_model.img_in.alpha", "diffusion_model.proj_out.diff_b"}
    with pytest.raises(LoRAError, match="loha layer cannot be written for diffusers"):
        convert_lora_state_dict(state, "diffusers")
    with pytest.raises(ValueError, match="unknown LoRA format to='kohya'"):
        convert_lora_state_dict(state, "kohya")


def test_text_encoder_layers_keep_released_names(tmp_path):
    state = {"lora_te_model_layers_3_self_attn_q_proj.lora_down.weight": torch.zeros(4, 16),
             "lora_te_model_layers_3_self_attn_q_proj.lora_up.weight": torch.zeros(16, 4),
             "transformer_blocks.59.attn.to_q.lora_A.weight": torch.zeros(4, 16),
             "transformer_blocks.59.attn.to_q.lora_B.weight": torch.zeros(16, 4)}
    assert set(convert_lora_state_dict(state, "comfyui")) == {
        "text_encoders.qwen25_7b.transformer.model.layers.3.self_attn.q_proj.lora_A.weight",
        "text_encoders.qwen25_7b.transformer.model.layers.3.self_attn.q_proj.lora_B.weight",
        "diffusion_model.transformer_blocks.59.attn.to_q.lora_A.weight",
        "diffusion_model.transformer_blocks.59.attn.to_q.lora_B.weight"}
    with pytest.warns(UserWarning, match="2 text-encoder tensors are left out"):
        out = convert_lora_state_dict(state, "diffsynth")
    assert set(out) == {"transformer_blocks.59.attn.to_q.lora_A.default.weight",
                        "transformer_blocks.59.attn.to_q.lora_B.default.weight"}


def test_written_file_metadata_and_overwrite(tmp_path):
    state = peft_layout({"img_in": (torch.ones(4, 64), torch.ones(64, 4))})
    src = tmp_path / "a.safetensors"
    save_file(state, src)
    dst = tmp_path / "b.safetensors"
    dst.write_text("an older file")
    convert_lora_file(src, dst, "diffusers")
    with safe_open(str(dst), framework="pt") as f:
        assert f.metadata()["qistudio_lora_format"] == "diffusers"
        assert torch.equal(f.get_tensor("transformer.img_in.lora_B.weight"), torch.full((64, 4), ALPHA / RANK))


def test_a_lora_saved_by_diffusers_with_its_alpha_in_metadata(inputs, tmp_path):
    """diffusers keeps a LoRA's lora_alpha (here 16 at rank 4) only in the file's metadata; we read it there."""
    from diffusers import QwenImagePipeline
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = reference_dit()
    base = inputs.diffusers(transformer)
    config = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                        target_modules=["to_q", "add_v_proj", "img_mod.1", "net.2", "proj_out"])
    transformer.add_adapter(config)
    expected = inputs.diffusers(transformer)
    assert rel_err(expected, base) > 1e-3
    QwenImagePipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                        transformer_lora_adapter_metadata=config.to_dict())
    dit = our_dit(reference_dit())
    load_lora(dit, tmp_path / "pytorch_lora_weights.safetensors")
    assert rel_err(inputs.ours(dit), expected) <= 1e-4


def test_lokr_agrees_with_peft(inputs):
    """A LoKr layer (whole w1, low-rank w2, no alpha) as peft's LoKr (through diffusers' load_lora_adapter) has it."""
    g = torch.Generator().manual_seed(7)
    module = "transformer_blocks.0.img_mlp.net.0.proj"  # (256, 64) = kron((4, 4), (64, 16))
    state = {f"{module}.lokr_w1": torch.randn(4, 4, generator=g) * 0.2,
             f"{module}.lokr_w2_a": torch.randn(64, 4, generator=g) * 0.2,
             f"{module}.lokr_w2_b": torch.randn(4, 16, generator=g) * 0.2}
    transformer = reference_dit()
    transformer.load_lora_adapter(dict(state), prefix=None, adapter_name="lokr")
    dit = our_dit(reference_dit())
    load_lora(dit, state)
    assert rel_err(inputs.ours(dit), inputs.diffusers(transformer)) <= 1e-4
