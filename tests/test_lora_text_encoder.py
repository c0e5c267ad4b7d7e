"""LoRA layers for the text encoder: routed there by their names, in every naming the files use."""

import pytest
import torch

from conftest import rel_err
from lora_files import our_dit, peft_layout, random_pairs
from qistudio.demo import demo_text_encoder_config
from qistudio.lora import list_loras, load_lora, set_lora_scale, unload_lora
from qistudio.models.text_encoder import QwenImageTextEncoder
from tiny_models import reference_dit

# Our module name -> how a file names it (kohya on the released names, diffusers-style prefix, current names).
FILE_NAMES = {
    "model.language_model.layers.0.self_attn.q_proj": "lora_te_model_layers_0_self_attn_q_proj",
    "model.language_model.layers.1.mlp.down_proj": "text_encoder.model.layers.1.mlp.down_proj",
    "model.language_model.layers.1.self_attn.v_proj": "model.language_model.layers.1.self_attn.v_proj",
}


def _text_encoder():
    torch.manual_seed(0)
    config = demo_text_encoder_config()
    config.text_config.vocab_size = 512
    return QwenImageTextEncoder(config).eval()


def _encode(text_encoder):
    ids = torch.tensor([[5, 17, 301, 44, 9, 2]])
    with torch.no_grad():
        return text_encoder(ids, torch.ones_like(ids))


def _file(pairs, alpha=8.0):
    state = {}
    for name, (down, up) in pairs.items():
        flat = FILE_NAMES[name]
        a, b = ("lora_down", "lora_up") if flat.startswith("lora_te_") else ("lora_A", "lora_B")
        state[f"{flat}.{a}.weight"], state[f"{flat}.{b}.weight"] = down, up
        state[f"{flat}.alpha"] = torch.tensor(alpha)
    return state


def test_text_encoder_layers_go_to_the_text_encoder():
    text_encoder, dit = _text_encoder(), our_dit(reference_dit())
    te_pairs = random_pairs(text_encoder, targets=list(FILE_NAMES), seed=3)
    dit_pairs = random_pairs(dit, targets=["transformer_blocks.0.attn.to_q"], seed=4)
    state = {**_file(te_pairs), **peft_layout(dit_pairs, prefix="diffusion_model.")}
    base = _encode(text_encoder)

    name = load_lora(dit, state, alpha=0.5, text_encoder=text_encoder)
    assert list_loras(dit)[0].num_layers == 4
    expected = _text_encoder()
    merged_state = {k: v.clone() for k, v in expected.state_dict().items()}
    for module, (down, up) in te_pairs.items():
        merged_state[f"{module}.weight"] += 0.5 * (8.0 / 4) * (up @ down)
    expected.load_state_dict(merged_state)
    assert rel_err(_encode(text_encoder), _encode(expected)) <= 1e-5
    assert rel_err(_encode(text_encoder), base) > 1e-3

    set_lora_scale(dit, name, 0.0)  # one scale for the whole file, both models
    assert torch.equal(_encode(text_encoder), base)
    unload_lora(dit)
    assert torch.equal(_encode(text_encoder), base)


def test_text_encoder_layers_without_a_text_encoder_warn():
    dit, text_encoder = our_dit(reference_dit()), _text_encoder()
    state = {**_file(random_pairs(text_encoder, targets=list(FILE_NAMES))),
             **peft_layout(random_pairs(dit, targets=["img_in"]))}
    with pytest.warns(UserWarning, match="applied to 1 layers; 9 of its 12 tensors.*pass text_encoder="):
        load_lora(dit, state)


def test_a_text_encoder_lora_loads_into_the_text_encoder_itself():
    text_encoder = _text_encoder()
    pairs = random_pairs(text_encoder, targets=list(FILE_NAMES), seed=8)
    state = {f"base_model.model.{name}.lora_A.weight": down for name, (down, _) in pairs.items()}
    state.update({f"base_model.model.{name}.lora_B.weight": up for name, (_, up) in pairs.items()})
    load_lora(text_encoder, state, fuse=True)
    expected = _text_encoder()
    merged_state = {k: v.clone() for k, v in expected.state_dict().items()}
    for module, (down, up) in pairs.items():
        merged_state[f"{module}.weight"] += up @ down
    expected.load_state_dict(merged_state)
    assert rel_err(_encode(text_encoder), _encode(expected)) <= 1e-5
