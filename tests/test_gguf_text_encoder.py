"""llama.cpp's Qwen2.5-VL GGUF text encoder (and its mmproj vision tower), as ComfyUI users have it: written here the
way convert_hf_to_gguf.py and the gguf package's quantisers write it, loaded by us, equal to transformers' model on
the gguf package's dequantisation of the same bytes."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from conftest import rel_err  # noqa: E402
from gguf_files import _released_name, write_llama_cpp_mmproj, write_llama_cpp_text_model  # noqa: E402
from qistudio.memory.quant_linear import QuantizedLinear  # noqa: E402
from qistudio.weights.build import load_model  # noqa: E402
from qistudio.weights.errors import CheckpointError  # noqa: E402

TEXT_TYPES = ("Q8_0", "Q4_0", "Q5_1", "Q4_1", "Q5_0")


def _cycle(types):
    counter = iter(range(10**6))

    def type_of(name: str, tensor: torch.Tensor) -> str:
        wanted = "Q8_0" if name == "token_embd.weight" else types[next(counter) % len(types)]
        return wanted if tensor.shape[-1] % 32 == 0 else "F16"  # llama-quantize falls back where rows are not blocks

    return type_of


@pytest.fixture(scope="module")
def llama_cpp(tmp_path_factory):
    """(transformers' tiny Qwen2.5-VL, the text GGUF, the mmproj GGUF, transformers' model holding the gguf package's
    dequantisation of what the two files store)."""
    from tiny_models import reference_text_encoder

    folder = tmp_path_factory.mktemp("llama_cpp")
    reference = reference_text_encoder()
    text, mmproj = folder / "Qwen2.5-VL-7B-Instruct-Q4_0.gguf", folder / "Qwen2.5-VL-7B-Instruct-mmproj-F16.gguf"
    dequantized = write_llama_cpp_text_model(text, reference, _cycle(TEXT_TYPES))
    dequantized |= write_llama_cpp_mmproj(mmproj, reference, _cycle(("Q8_0", "F16")))
    expected = copy.deepcopy(reference)
    state = expected.state_dict()
    for key in state:
        released = _released_name(key)
        if released != "lm_head.weight":  # the unused vocabulary projection stays as it was
            state[key] = dequantized[released]
    expected.load_state_dict(state)
    return reference, text, mmproj, expected.eval()


def _text_inputs():
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 151000, (2, 12), generator=generator)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0  # a padded row
    return ids, mask


def _image_inputs():
    """One 56x56 image: 4x4 patches of 14 (x2 frames), merged 2x2 into 4 image tokens after <|vision_start|>."""
    generator = torch.Generator().manual_seed(8)
    ids = torch.tensor([[151644, 872, 151652, *[151655] * 4, 151653, 3838, 374, 151645]])
    pixels = torch.randn(16, 3 * 2 * 14 * 14, generator=generator)
    return ids, torch.ones_like(ids), pixels, torch.tensor([[1, 4, 4]])


def test_text_and_vision_equal_transformers_on_the_dequantised_weights(llama_cpp):
    _, text, mmproj, expected = llama_cpp
    kind, ours = load_model([text, mmproj], dtype=torch.float32)
    assert kind == "text_encoder" and ours.has_vision
    layer = ours.model.language_model.layers[1]
    assert isinstance(layer.self_attn.q_proj, QuantizedLinear) and isinstance(layer.mlp.down_proj, QuantizedLinear)
    assert isinstance(ours.model.visual.blocks[0].mlp.gate_proj, QuantizedLinear)  # Q8_0 in the mmproj
    # Weight by weight: the gguf package's float32 dequantisation, to diffusers' float16 rounding (of d * q and, for
    # Q4_1 / Q5_1, of + m: absolute, a step of the block's range).
    theirs = dict(expected.named_parameters())
    for name, weight in ours.named_parameters():
        if isinstance(ours.get_submodule(name.rpartition(".")[0]), QuantizedLinear) and name.endswith(".weight"):
            weight = ours.get_submodule(name.rpartition(".")[0]).dequantized_weight(torch.float32)
        reference = theirs[name]
        assert (weight - reference).abs().max() <= 2**-9 * reference.abs().max(), name
    ids, mask = _text_inputs()
    with torch.no_grad():
        assert rel_err(ours(ids, mask), expected.model(input_ids=ids, attention_mask=mask).last_hidden_state) < 2e-3
        ids, mask, pixels, grid = _image_inputs()
        states = ours(ids, mask, pixels, grid)
        reference = expected.model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)
        assert rel_err(states, reference.last_hidden_state) < 2e-3


def test_q_and_k_rows_are_not_permuted(llama_cpp):
    """llama.cpp permutes q/k rows for LLaMA only; a loader that undid it for qwen2vl would move the rotary pairs."""
    reference, text, _, _ = llama_cpp
    _, ours = load_model([text], dtype=torch.float32)
    q_proj = ours.model.language_model.layers[0].self_attn.q_proj.dequantized_weight(torch.float32)
    original = reference.model.language_model.layers[0].self_attn.q_proj.weight
    assert rel_err(q_proj, original) < 0.1  # the file's rows are transformers' rows (quantised)
    heads = reference.config.text_config.num_attention_heads
    permuted = original.reshape(heads, 2, -1, original.shape[1]).swapaxes(1, 2).reshape(original.shape)
    assert rel_err(q_proj, permuted) > 0.5


def test_without_the_mmproj_text_to_image_works_and_edit_names_what_is_missing(llama_cpp, tiny_repo):
    from PIL import Image

    from qistudio import ModelConfig, QwenImagePipeline
    from qistudio.validation import InputError

    _, text, mmproj, _ = llama_cpp
    _, with_vision = load_model([text, mmproj], dtype=torch.float32)
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=sorted(str(p) for p in (tiny_repo / "transformer").glob("*.safetensors"))),
                       ModelConfig(path=str(text)),
                       ModelConfig(path=str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors"))],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )  # fmt: skip
    assert not pipe.components.text_encoder.has_vision
    ids, mask = _text_inputs()
    with torch.no_grad():
        assert torch.equal(pipe.components.text_encoder(ids, mask), with_vision(ids, mask))
    image = pipe("a red kite", seed=1, num_inference_steps=1, height=32, width=32)
    assert image.size == (32, 32)
    with pytest.raises(InputError, match=rf"{text.name} does not hold: add its vision tower, llama.cpp's mmproj"):
        pipe("make it blue", edit_image=Image.new("RGB", (32, 32)), seed=1, num_inference_steps=1)


def _write_raw(path, architecture, tensors):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=architecture)
    for name, (data, raw) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_other_models_and_unreadable_types_are_one_clear_error(llama_cpp, tmp_path):
    import gguf

    reference, _, mmproj, _ = llama_cpp
    llama = tmp_path / "llama.gguf"
    write_llama_cpp_text_model(llama, reference, _cycle(("Q8_0",)), architecture="llama")
    with pytest.raises(CheckpointError, match="a llama.cpp language model of architecture 'llama'; qistudio reads"):
        load_model([llama])
    with pytest.raises(CheckpointError, match="an mmproj file holds only the vision tower"):
        load_model([mmproj])
    q8_k = np.zeros((2, 292), np.uint8)  # two rows of one Q8_K block: no reader for it
    unreadable = _write_raw(tmp_path / "q8k.gguf", "qwen2vl", {
        "token_embd.weight": (np.zeros((4, 32), np.float32), None),
        "blk.0.attn_q.weight": (q8_k, gguf.GGMLQuantizationType.Q8_K)})
    with pytest.raises(CheckpointError, match=r"tensor 'blk.0.attn_q.weight' is stored as Q8_K, which qistudio "
                                              r"cannot read"):
        load_model([unreadable])


def test_generate_with_gguf_dit_and_gguf_text_encoder_equals_the_pipeline(llama_cpp, tiny_repo, tmp_path):
    """qistudio generate --model DIT.gguf --text-encoder TEXT.gguf --text-encoder MMPROJ.gguf: the files as
    ModelConfig(path=[...]) takes them, the rest from the base model's files (--model-dir)."""
    from PIL import Image

    from qistudio import ModelConfig, QwenImagePipeline
    from qistudio.imageio import read_png_parameters
    from test_gguf_cli import cli

    _, text, mmproj, _ = llama_cpp
    transformer = shutil.copytree(tiny_repo / "transformer", tmp_path / "transformer")
    dit = transformer / "dit-Q8_0.gguf"  # beside config.json: the tiny DiT's RoPE axes
    assert cli("quantize", transformer, dit, "--type", "Q8_0") == 0
    base = tmp_path / "models" / "Qwen" / "Qwen-Image"
    for part in ("vae", "tokenizer"):
        shutil.copytree(tiny_repo / part, base / part)
    (base / "text_encoder").mkdir()  # the base model's own text encoder is not read
    out = tmp_path / "gguf.png"
    assert cli("generate", "a small boat", "--model", dit, "--text-encoder", text, "--text-encoder", mmproj,
               "--model-dir", tmp_path / "models", "--skip-download", "--size", "48x32", "--steps", 2, "--seed", 3,
               "--device", "cpu", "-o", out) == 0
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(dit)), ModelConfig(path=[str(text), str(mmproj)]),
                       ModelConfig(path=str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors"))],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )  # fmt: skip
    assert pipe.components.text_encoder.has_vision
    expected = pipe("a small boat", seed=3, num_inference_steps=2, height=32, width=48)
    with Image.open(out) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    # The PNG records the text encoder's files: --from-png remakes the image from them.
    assert read_png_parameters(out)["text_encoder"] == [str(text.resolve()), str(mmproj.resolve())]
    again = tmp_path / "again.png"
    assert cli("generate", "--from-png", out, "--model-dir", tmp_path / "models", "--skip-download", "--device",
               "cpu", "-o", again) == 0
    with Image.open(again) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
