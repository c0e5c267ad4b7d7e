"""LoRA file attacks: broken tensors, ranks, alphas and shapes, LoHa factors of different ranks, bad adapter_config.json
and diffusers metadata. Each must end in ONE LoRAError whose message names the file (and the layer where one is at
fault), through pipe.load_lora; a good file still loads. The model-file attacks: tests/test_fuzz_loaders.py."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from qistudio.demo import DEMO_DIT
from qistudio.lora import LoRAError
from qistudio.models.dit import QwenImageDiT
from test_fuzz_loaders import dit_file, dit_state, pipe, raises_naming  # noqa: F401 (fixtures)


# --- LoRA files ---------------------------------------------------------------------------------------------------

LORA_LAYERS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2")


def lora_state(rank=2, alpha=4.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dit = QwenImageDiT(DEMO_DIT)
    state = {}
    for layer in LORA_LAYERS:
        out_features, in_features = dit.get_submodule(layer).weight.shape
        state[f"{layer}.lora_A.weight"] = torch.randn(rank, in_features, generator=g) * 0.1
        state[f"{layer}.lora_B.weight"] = torch.randn(out_features, rank, generator=g) * 0.1
        if alpha is not None:
            state[f"{layer}.alpha"] = torch.tensor(alpha)
    return state


Q = LORA_LAYERS[0]


def _set(key, value):
    def change(state):
        state[key] = value(state[key]) if callable(value) else value
    return change


def _poke(key, value):
    def change(state):
        state[key] = state[key].clone()
        state[key].view(-1)[1] = value
    return change


LORA_ATTACKS = [
    ("NaN alpha", _set(f"{Q}.alpha", torch.tensor(float("nan"))), rf"{Q}\.alpha holds NaN or infinity"),
    ("infinite alpha", _set(f"{Q}.alpha", torch.tensor(float("inf"))), rf"{Q}\.alpha holds NaN"),
    ("zero alpha", _set(f"{Q}.alpha", torch.tensor(0.0)), rf"{Q}\.alpha: the alpha is 0.0.* positive finite"),
    ("negative alpha", _set(f"{Q}.alpha", torch.tensor(-4.0)), rf"{Q}\.alpha: the alpha is -4.0"),
    ("negative zero alpha", _set(f"{Q}.alpha", torch.tensor(-0.0)), rf"{Q}\.alpha: the alpha is -0.0"),
    ("two-number alpha", _set(f"{Q}.alpha", torch.tensor([4.0, 4.0])), rf"{Q}\.alpha is .* an alpha is one number"),
    ("bool alpha", _set(f"{Q}.alpha", torch.tensor(True)), rf"{Q}\.alpha is torch.bool .* one number"),
    ("NaN in lora_A", _poke(f"{Q}.lora_A.weight", float("nan")), rf"{Q}\.lora_A\.weight holds NaN"),
    ("infinity in lora_B", _poke(f"{Q}.lora_B.weight", float("-inf")), rf"{Q}\.lora_B\.weight holds NaN"),
    ("integer lora_A", _set(f"{Q}.lora_A.weight", lambda t: (t * 100).to(torch.int32)),
     rf"{Q}\.lora_A\.weight: torch.int32 where a LoRA holds float weights"),
    ("mismatched ranks", _set(f"{Q}.lora_B.weight", lambda t: torch.zeros(t.shape[0], 3)),
     r"lora_B \[64, 3\] and lora_A \[2, 64\] have different ranks"),
    ("shape of another model", _set(f"{Q}.lora_A.weight", lambda t: torch.zeros(2, 32)),
     rf"does not fit the model.*{Q}.* delta is \[64, 32\], the weight \[64, 64\]"),
    ("one-dimensional lora_A", _set(f"{Q}.lora_A.weight", lambda t: t.flatten()),
     rf"{Q}\.lora_A\.weight: shape \[128\]; a down tensor has 2 dimensions"),
    ("empty rank", _set(f"{Q}.lora_A.weight", lambda t: t[:0]), rf"{Q}\.lora_A\.weight: shape \[0, 64\] is empty"),
    ("half a pair", lambda state: state.pop(f"{Q}.lora_B.weight"), r"half a LoRA pair"),
]


@pytest.mark.parametrize("name, change, expected", LORA_ATTACKS, ids=[case[0] for case in LORA_ATTACKS])
def test_lora_file_attacks(name, change, expected, pipe, tmp_path):
    state = lora_state()
    change(state)
    path = tmp_path / "style.safetensors"
    save_file(state, str(path))
    with raises_naming(LoRAError, path, expected):
        pipe.load_lora(pipe.dit, str(path))
    assert pipe.list_loras() == []
    with pytest.raises(LoRAError) as info:  # the same from a state dict
        pipe.load_lora(pipe.dit, state_dict=state)
    assert re.search(expected, str(info.value), re.S), str(info.value)
    assert pipe.list_loras() == []


def test_loha_factors_of_different_ranks(pipe, tmp_path):
    state = {f"lycoris_{Q.replace('.', '_')}.hada_w1_a": torch.ones(64, 2),
             f"lycoris_{Q.replace('.', '_')}.hada_w1_b": torch.ones(3, 64),
             f"lycoris_{Q.replace('.', '_')}.hada_w2_a": torch.ones(64, 2),
             f"lycoris_{Q.replace('.', '_')}.hada_w2_b": torch.ones(2, 64)}
    path = tmp_path / "loha.safetensors"
    save_file(state, str(path))
    with raises_naming(LoRAError, path, r"hada_w1_a \[64, 2\] and hada_w1_b \[3, 64\] have different ranks"):
        pipe.load_lora(pipe.dit, str(path))


@pytest.mark.parametrize("alpha", ["8", "nan", None, [4.0], float("nan"), float("inf"), True])
def test_a_state_dict_alpha_that_is_no_number(alpha, pipe):
    state = lora_state(alpha=None)
    state[f"{Q}.alpha"] = alpha
    with pytest.raises(LoRAError, match=rf"the given LoRA state dict: '{re.escape(Q)}\.alpha' is .* alpha must be"):
        pipe.load_lora(pipe.dit, state_dict=state)


def test_a_state_dict_value_that_is_no_tensor(pipe):
    state = lora_state()
    state[f"{Q}.lora_A.weight"] = [[0.1] * 64] * 2
    with pytest.raises(LoRAError, match=rf"holds a list under '{re.escape(Q)}\.lora_A\.weight', not a tensor"):
        pipe.load_lora(pipe.dit, state_dict=state)


ADAPTER_CONFIGS = [
    (b'{"lora_alpha": 8,', r"not valid JSON: .* line 1 column 18"),
    (b"[8]", r"expected a JSON object, found a JSON list"),
    (b'{"lora_alpha": NaN}', r"NaN is not a number JSON allows"),
    (b'{"lora_alpha": 1e999}', r"1e999 is beyond the range of a float"),
    (b'{"lora_alpha": "8"}', r"lora_alpha is '8'; an alpha must be a positive finite number"),
    (b'{"lora_alpha": 0}', r"lora_alpha is 0"),
    (b'{"lora_alpha": true}', r"lora_alpha is True"),
    (b'{"lora_alpha": 8, "alpha_pattern": [1]}', r"alpha_pattern is a JSON list"),
    (b'{"lora_alpha": 8, "alpha_pattern": {"to_q": "x"}}', r"alpha_pattern\['to_q'\] is 'x'"),
    (b'{"lora_alpha": 8, "use_rslora": "yes"}', r"use_rslora is 'yes'"),
    (b'\xff\xfe{"lora_alpha": 8}', r"not UTF-8"),
]


@pytest.mark.parametrize("text, expected", ADAPTER_CONFIGS)
def test_bad_adapter_config_json(text, expected, pipe, tmp_path):
    save_file(lora_state(alpha=None), str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_bytes(text)
    with raises_naming(LoRAError, tmp_path / "adapter_config.json", expected):
        pipe.load_lora(pipe.dit, str(tmp_path))
    assert pipe.list_loras() == []


@pytest.mark.parametrize("metadata, expected", [
    ('{"transformer.lora_alpha": ', r"not valid JSON"),
    ('{"transformer.lora_alpha": NaN}', r"NaN is not a number"),
    ('{"transformer.lora_alpha": -1}', r"lora_alpha is -1"),
    ("[]", r"expected a JSON object"),
])
def test_bad_diffusers_lora_metadata(metadata, expected, pipe, tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(lora_state(alpha=None), str(path), metadata={"lora_adapter_metadata": metadata})
    with raises_naming(LoRAError, path, r"metadata lora_adapter_metadata", expected):
        pipe.load_lora(pipe.dit, str(path))


def test_a_good_lora_still_loads(pipe, tmp_path):
    path = tmp_path / "good.safetensors"
    save_file(lora_state(), str(path))
    name = pipe.load_lora(pipe.dit, str(path))
    assert [info.name for info in pipe.list_loras()] == [name]
    pipe.unload_lora(name)
