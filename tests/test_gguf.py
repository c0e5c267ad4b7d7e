"""GGUF DiT files (ComfyUI-GGUF's layout): read as they are, weights kept quantised, every number as diffusers'."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from conftest import rel_err  # noqa: E402
from gguf_files import RANDOM_BLOCK_TYPES, mixed_types, random_blocks, reference_wide_dit, write_gguf  # noqa: E402
from lora_files import Inputs  # noqa: E402
from qistudio.memory.quant_linear import QuantizedLinear  # noqa: E402
from qistudio.ops import dequant  # noqa: E402
from qistudio.weights.build import load_model  # noqa: E402
from qistudio.weights.errors import CheckpointError  # noqa: E402
from qistudio.weights.gguf_io import read_gguf_layout  # noqa: E402

# Every type a layer keeps quantised, spread over the block linears (rows that are not whole blocks fall back).
ALL_KEPT = ("Q4_K", "Q8_0", "Q6_K", "Q4_0", "Q5_K", "Q3_K", "Q2_K", "IQ4_XS", "IQ4_NL", "Q5_0", "Q5_1", "Q4_1")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(diffusers' wide tiny DiT, a folder with its config, its GGUF file with every kept type)."""
    folder = tmp_path_factory.mktemp("gguf")
    reference = reference_wide_dit()
    reference.save_pretrained(folder / "transformer")
    # Beside the config.json (as our loader reads it there): the tiny DiT's RoPE axes are not the released model's.
    path = write_gguf(folder / "transformer" / "dit-mixed.gguf", reference.state_dict(), mixed_types(ALL_KEPT))
    return reference, folder, path


def diffusers_gguf(path, folder):
    from diffusers import GGUFQuantizationConfig, QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_single_file(
        str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=str(folder),
        subfolder="transformer", torch_dtype=torch.float32).eval()


def _sane_blocks(qtype: str, rows: int = 48) -> torch.Tensor:
    kind = dequant.GGML_BY_NAME[qtype]
    if qtype in RANDOM_BLOCK_TYPES:
        return torch.from_numpy(random_blocks((rows, kind.block * 2), qtype, seed=5))
    from gguf_files import encode

    weight = torch.randn(rows, kind.block * 2) * 0.05
    return torch.from_numpy(encode(weight, qtype)[0])


@pytest.mark.parametrize("qtype", list(dequant.GGUF_DEQUANTIZERS))
def test_every_type_dequantizes_as_diffusers_bit_for_bit(qtype):
    """Any bytes (NaN and infinite scales included) decode to diffusers' values and dtype; sane blocks to the gguf
    package's float32 reference within float16 rounding."""
    import gguf
    from diffusers.quantizers.gguf.utils import dequantize_functions

    kind = dequant.GGML_BY_NAME[qtype]
    any_bytes = torch.randint(0, 256, (96, kind.nbytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    expected = dequantize_functions[gguf.GGMLQuantizationType[qtype]](any_bytes, kind.block, kind.nbytes)
    got = dequant.GGUF_DEQUANTIZERS[qtype](any_bytes)
    assert got.dtype == expected.dtype and torch.equal(got.view(torch.int16 if got.element_size() == 2 else torch.int32),
                                                       expected.view(torch.int16 if got.element_size() == 2 else torch.int32))
    if qtype == "BF16":
        return
    blocks = _sane_blocks(qtype)
    reference = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[qtype]))
    ours = dequant.dequantize_gguf(blocks, qtype, tuple(reference.shape), torch.float32)
    assert (ours - reference).abs().max() <= 2e-3 * reference.abs().max()


def test_gguf_dit_keeps_its_weights_quantized_and_equals_diffusers(wide):
    reference, folder, path = wide
    tensors, _ = read_gguf_layout(path)
    kind, ours = load_model([path], dtype=torch.float32)
    assert kind == "dit"
    quantized = {name: t for name, t in tensors.items() if t.type_name not in ("F32", "F16", "BF16")}
    assert {t.type_name for t in quantized.values()} == set(ALL_KEPT)
    layers = {name: m for name, m in ours.named_modules() if isinstance(m, QuantizedLinear)}
    assert {f"{name}.weight" for name in layers} == set(quantized)
    import gguf

    file = gguf.GGUFReader(str(path))
    raw = {t.name: torch.from_numpy(np.array(t.data)) for t in file.tensors}
    theirs = diffusers_gguf(path, folder)
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    for name, layer in layers.items():
        assert layer.quant_type == quantized[f"{name}.weight"].type_name
        assert torch.equal(layer.weight, raw[f"{name}.weight"])  # the file's bytes, not re-encoded
        expected = dequantize_gguf_tensor(theirs.get_submodule(name).weight).to(torch.float32)
        assert torch.equal(layer.dequantized_weight(torch.float32), expected), name
    inputs = Inputs()
    assert rel_err(inputs.ours(ours), inputs.diffusers(theirs)) < 1e-5


def test_a_prefixed_file_loads_as_the_plain_one(wide, tmp_path):
    """ComfyUI single files wrap the DiT in model.diffusion_model.; F16 and BF16 weights load as plain floats."""
    reference, _, _ = wide
    state = reference.state_dict()
    plain = write_gguf(tmp_path / "plain.gguf", state, mixed_types(("Q8_0", "F16", "BF16")))
    prefixed = write_gguf(tmp_path / "prefixed.gguf", state, mixed_types(("Q8_0", "F16", "BF16")),
                          prefix="model.diffusion_model.")
    _, ours = load_model([prefixed], dtype=torch.float32)
    rounded = {"F16": torch.float16, "BF16": torch.bfloat16}
    seen = set()
    for name, tensor in read_gguf_layout(prefixed)[0].items():
        name = name.removeprefix("model.diffusion_model.")
        if tensor.type_name in rounded:
            layer = ours.get_submodule(name.removesuffix(".weight"))
            assert type(layer) is torch.nn.Linear
            assert torch.equal(layer.weight, state[name].to(rounded[tensor.type_name]).float())
        elif tensor.type_name == "Q8_0":
            assert isinstance(ours.get_submodule(name.removesuffix(".weight")), QuantizedLinear)
        seen.add(tensor.type_name)
    assert {"Q8_0", "F16", "BF16", "F32"} == seen
    inputs = Inputs()
    assert torch.equal(inputs.ours(ours), inputs.ours(load_model([plain], dtype=torch.float32)[1]))


def test_types_without_a_kernel_are_decoded_once_at_load(wide, tmp_path):
    """What the gguf package reads beyond diffusers' types (IQ2, IQ3, IQ1, TQ, MXFP4) loads as dense weights equal
    to the package's dequantisation."""
    import gguf

    reference, _, _ = wide
    state = reference.state_dict()
    types = {"transformer_blocks.0.attn.to_q.weight": "IQ2_XXS", "transformer_blocks.0.attn.to_k.weight": "IQ3_S",
             "transformer_blocks.1.attn.to_v.weight": "TQ2_0", "transformer_blocks.1.attn.to_q.weight": "MXFP4"}
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), arch="qwen_image")
    blocks = {}
    for index, (name, tensor) in enumerate(state.items()):
        qtype = types.get(name)
        if qtype is None:
            writer.add_tensor(name, tensor.float().numpy())
            continue
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        rng = np.random.default_rng(index)
        raw = rng.integers(0, 256, (tensor.shape[0], tensor.shape[1] // block * nbytes), dtype=np.uint8)
        if qtype != "MXFP4":  # each block's float16 d (first, or last for TQ2_0): keep it small
            at = nbytes - 2 if qtype == "TQ2_0" else 0
            raw.reshape(tensor.shape[0], -1, nbytes)[..., at : at + 2] = np.array([0.001], np.float16).view(np.uint8)
        else:
            raw.reshape(tensor.shape[0], -1, nbytes)[..., 0] = 120  # E8M0 scale 2^-7
        blocks[name] = raw
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, ours = load_model([path], dtype=torch.float32)
    for name, qtype in types.items():
        module = ours.get_submodule(name.removesuffix(".weight"))
        assert type(module) is torch.nn.Linear
        expected = gguf.quants.dequantize(blocks[name], gguf.GGMLQuantizationType[qtype])
        assert torch.equal(module.weight, torch.from_numpy(expected))


def test_a_tensor_reshaped_by_comfyui_gguf_keeps_its_real_shape(wide, tmp_path):
    """ComfyUI-GGUF's converter may store a weight as rows of 256 and record the real shape in the metadata."""
    import gguf

    from gguf_files import encode

    reference, _, _ = wide
    state = reference.state_dict()
    target = "transformer_blocks.0.txt_mod.1.weight"  # (1536, 256): stored as (1536, 256) rows all the same
    path = tmp_path / "reshaped.gguf"
    writer = gguf.GGUFWriter(str(path), arch="qwen_image")
    for name, tensor in state.items():
        if name == target:
            flat = tensor.reshape(-1, 512)  # rows of 512: not the real rows
            data, raw = encode(flat, "Q4_K")
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(tensor.shape))
            writer.add_tensor(name, data, raw_dtype=raw)
        else:
            writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, ours = load_model([path], dtype=torch.float32)
    layer = ours.transformer_blocks[0].txt_mod[1]
    assert isinstance(layer, QuantizedLinear) and layer.weight_shape == tuple(state[target].shape)
    expected = dequant.dequantize_gguf(torch.from_numpy(encode(state[target].reshape(-1, 512), "Q4_K")[0]), "Q4_K",
                                       tuple(state[target].shape), torch.float32)
    assert torch.equal(layer.dequantized_weight(torch.float32), expected)


def _tiny_state():
    from tiny_models import reference_dit

    return reference_dit().state_dict()


def _rewrite_type(path, tmp_path, name: str, type_id: int):
    """A copy of a GGUF file with tensor `name`'s type id replaced (its byte size kept by choosing the id)."""
    data = bytearray(path.read_bytes())
    encoded = name.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_id)
    out = tmp_path / "changed.gguf"
    out.write_bytes(bytes(data))
    return out


def test_unreadable_types_and_broken_files_are_one_clear_error(wide, tmp_path):
    path = write_gguf(tmp_path / "q8.gguf", wide[0].state_dict(), mixed_types(("Q8_0",)))
    name = "transformer_blocks.0.attn.to_q.weight"
    with pytest.raises(CheckpointError, match=r"to_q.weight.*Q1_0, which qistudio cannot read"):
        load_model([_rewrite_type(path, tmp_path, name, 41)])  # Q1_0 (18 bytes per 128): no decoder anywhere
    with pytest.raises(CheckpointError, match=r"to_q.weight.*and .*overlap"):
        load_model([_rewrite_type(path, tmp_path, name, 9)])  # Q8_1: 40-byte blocks run into the next tensor
    with pytest.raises(CheckpointError, match=r"to_q.weight.*GGML type id 77, which qistudio does not know"):
        load_model([_rewrite_type(path, tmp_path, name, 77)])
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"truncated: tensor .* ends at byte"):
        load_model([truncated])
    header_cut = tmp_path / "cut.gguf"
    header_cut.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated GGUF header"):
        load_model([header_cut])
    not_gguf = tmp_path / "other.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_model([not_gguf])
    version = bytearray(path.read_bytes())
    version[4:8] = struct.pack("<I", 1)
    old = tmp_path / "v1.gguf"
    old.write_bytes(bytes(version))
    with pytest.raises(CheckpointError, match="GGUF version 1; qistudio reads versions 2 and 3"):
        load_model([old])


def test_a_nan_scale_is_named_at_load(tmp_path):
    state = _tiny_state()
    path = write_gguf(tmp_path / "q8.gguf", state, mixed_types(("Q8_0",)))
    tensors, _ = read_gguf_layout(path)
    target = tensors["transformer_blocks.1.img_mod.1.weight"]
    data = bytearray(path.read_bytes())
    data[target.offset + 34 * 3 : target.offset + 34 * 3 + 2] = np.array([np.nan], np.float16).tobytes()
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"NaN or infinite scales.*transformer_blocks.1.img_mod.1.weight"):
        load_model([bad])


def test_four_step_pipeline_equals_diffusers_loaded_from_the_same_file(wide, tiny_repo):
    """QwenImagePipeline with the GGUF DiT against diffusers' QwenImagePipeline with
    from_single_file(quantization_config=GGUFQuantizationConfig(compute_dtype=float32)) of the same file."""
    from qistudio import ModelConfig, QwenImagePipeline
    from qistudio.ops.packing import patchify, unpatchify
    from tiny_models import reference_pipeline

    _, folder, path = wide
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(path)), ModelConfig(path=str(tiny_repo / "text_encoder")),
                       ModelConfig(path=str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors"))],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )  # fmt: skip
    assert isinstance(pipe.dit.transformer_blocks[0].img_mlp.net[2], QuantizedLinear)
    reference = reference_pipeline(tiny_repo, transformer=diffusers_gguf(path, folder))
    height, width = 64, 96
    noise = torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(7))
    prompt, negative = "a red fox in the snow, watercolour", "blurry"
    with torch.no_grad():
        expected = reference(prompt=prompt, negative_prompt=negative, true_cfg_scale=4.0, height=height, width=width,
                             num_inference_steps=4, latents=patchify(noise), output_type="latent").images
    got = pipe(prompt, negative_prompt=negative, cfg_scale=4.0, height=height, width=width, num_inference_steps=4,
               noise=noise, cfg_norm_rescale=True, output_type="latent", progress_bar_cmd=lambda x: x)
    assert rel_err(got, unpatchify(expected, height // 16, width // 16)) <= 1e-4


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    """A tiny DiT's GGUF file (Q8_0 / Q4_0 / F16 block linears) and where its tensor data begins."""
    path = write_gguf(tmp_path_factory.mktemp("fuzz") / "dit.gguf", _tiny_state(), mixed_types(("Q8_0", "Q4_0", "F16")))
    tensors, _ = read_gguf_layout(path)
    return path.read_bytes(), min(t.offset for t in tensors.values())


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_a_corrupted_gguf_header_is_one_checkpoint_error(small_gguf, tmp_path_factory, flips, cut):
    """Any bytes changed in the header (names, counts, shapes, types, offsets, metadata), or the file cut short:
    the model loads, or one CheckpointError; never another exception."""
    data, header_end = small_gguf
    corrupted = bytearray(data)
    for position, value in flips:
        corrupted[int(position * header_end)] = value
    if cut is not None:
        corrupted = corrupted[: int(cut * len(corrupted))]
    path = tmp_path_factory.mktemp("corrupt") / "dit.gguf"
    path.write_bytes(bytes(corrupted))
    try:
        load_model([path], dtype=torch.float32)
    except CheckpointError:
        pass
