"""bitsandbytes NF4 / FP4 / int8 checkpoints (the layout diffusers and transformers save): weights kept quantised,
every number as bitsandbytes' own (its CPU build runs here: dequantize_4bit, int8_vectorwise_dequant, Linear4bit)."""

from __future__ import annotations

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from safetensors.torch import load_file, save_file  # noqa: E402

from conftest import rel_err  # noqa: E402
from gguf_files import reference_wide_dit, write_bnb_4bit, write_bnb_int8  # noqa: E402
from lora_files import Inputs  # noqa: E402
from qistudio.memory.quant_linear import QuantizedLinear  # noqa: E402
from qistudio.weights.build import load_model  # noqa: E402
from qistudio.weights.errors import CheckpointError  # noqa: E402
from qistudio.weights.quantized_source import QuantizedSource  # noqa: E402


def _in_blocks(name, tensor):
    return tensor.dim() == 2 and name.startswith("transformer_blocks.")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nf4") / "transformer"
    reference = reference_wide_dit()
    reference.save_pretrained(folder)
    state = reference.state_dict()
    nf4 = write_bnb_4bit(folder / "dit-nf4.safetensors", state, "nf4", nested=True, quantize=_in_blocks)
    return reference, nf4


def bnb_transformer(reference, path):
    """diffusers' DiT with bitsandbytes' Linear4bit layers holding the file's tensors (what BitsAndBytesConfig
    builds on a GPU), on the CPU."""
    import copy

    model = copy.deepcopy(reference)
    tensors = load_file(str(path))
    for name, module in list(model.named_modules()):
        state_key = f"{name}.weight.quant_state.bitsandbytes__nf4"
        if state_key not in tensors:
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=True, compute_dtype=torch.float32,
                                  quant_type="nf4")
        stats = {k.removeprefix(f"{name}.weight."): v for k, v in tensors.items() if k.startswith(f"{name}.weight.")}
        layer.weight = bnb.nn.Params4bit.from_prequantized(data=tensors[f"{name}.weight"], quantized_stats=stats,
                                                           requires_grad=False, device="cpu")
        layer.bias = torch.nn.Parameter(tensors[f"{name}.bias"], requires_grad=False)
        # On a CPU with AVX512-BF16, bitsandbytes repacks the weight to bfloat16 for its CPU kernel; its GPU path
        # (what BitsAndBytesConfig runs) dequantises to the stored dtype and calls F.linear. Keep the latter.
        layer.support_avx512bf16_for_cpu = False
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model.eval()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_4bit_weights_decode_as_bitsandbytes_bit_for_bit(tmp_path, quant_type, nested, blocksize):
    """37 rows of 384: 222 blocks of 64 (111 of 128), not a whole number of 256 nested absmaxes. (Rows stay whole
    blocks: bitsandbytes' CPU kernel indexes blocks per row, its quantiser and CUDA kernel over the flat weight;
    they agree only there, and a DiT's rows are always whole blocks.)"""
    import bitsandbytes.functional as F

    weight = torch.randn(37, 384) * 0.05
    path = write_bnb_4bit(tmp_path / "w.safetensors", {"w.weight": weight}, quant_type, nested, blocksize)
    source = QuantizedSource([path])
    assert list(source.keys()) == ["w.weight"] and source.shapes["w.weight"] == (37, 384)
    assert source.dtypes["w.weight"] == quant_type.upper()
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        state.dtype = dtype
        expected = F.dequantize_4bit(packed, state)
        got = source.get("w.weight").to(dtype) if dtype == torch.float32 else None
        layer = QuantizedLinear(384, 37, quant_type.upper(), source.stored("w.weight"), bias=False,
                                blocksize=blocksize, nested_offset=source.quantized["w.weight"].offset)
        ours = layer.dequantized_weight(dtype)
        assert ours.dtype == expected.dtype and torch.equal(ours, expected)
        if got is not None:
            assert torch.equal(got, expected)


def test_int8_weights_decode_as_bitsandbytes(tmp_path):
    import bitsandbytes.functional as F

    weight = torch.randn(24, 64) * 0.05
    path = write_bnb_int8(tmp_path / "w.safetensors", {"w.weight": weight})
    source = QuantizedSource([path])
    assert list(source.keys()) == ["w.weight"] and source.dtypes["w.weight"] == "INT8"
    codes, row_scale, _ = F.int8_vectorwise_quant(weight.half())
    expected = F.int8_vectorwise_dequant(codes, row_scale.float())
    layer = QuantizedLinear(64, 24, "INT8", source.stored("w.weight"), bias=False)
    assert torch.equal(layer.dequantized_weight(torch.float32), expected)


def test_nf4_dit_keeps_its_weights_and_equals_bitsandbytes_layers(wide):
    reference, path = wide
    kind, ours = load_model([path], dtype=torch.float32)
    tensors = load_file(str(path))
    layers = {name: m for name, m in ours.named_modules() if isinstance(m, QuantizedLinear)}
    assert {f"{name}.weight" for name in layers} == {k for k, v in reference.state_dict().items()
                                                     if _in_blocks(k, v)}
    for name, layer in layers.items():
        assert layer.quant_type == "NF4" and torch.equal(layer.weight, tensors[f"{name}.weight"])
        assert torch.equal(layer.weight_absmax, tensors[f"{name}.weight.absmax"])  # nested: 8-bit absmaxes kept
    theirs = bnb_transformer(reference, path)
    inputs = Inputs()
    assert rel_err(inputs.ours(ours), inputs.diffusers(theirs)) < 1e-5


def test_int8_dit_loads_quantized(tmp_path):
    reference = reference_wide_dit()
    path = write_bnb_int8(tmp_path / "dit-int8.safetensors", reference.state_dict(), quantize=_in_blocks)
    _, ours = load_model([path], dtype=torch.float32)
    layer = ours.transformer_blocks[1].attn.to_v
    assert isinstance(layer, QuantizedLinear) and layer.quant_type == "INT8" and layer.weight.dtype == torch.int8
    assert rel_err(layer.dequantized_weight(torch.float32), reference.transformer_blocks[1].attn.to_v.weight) < 0.01


def test_broken_bitsandbytes_files_are_one_clear_error(tmp_path):
    weight = torch.randn(16, 128) * 0.05
    good = load_file(str(write_bnb_4bit(tmp_path / "w.safetensors", {"w.weight": weight}, nested=True)))

    def load_changed(change, match):
        tensors = dict(good)
        change(tensors)
        path = tmp_path / "changed.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(CheckpointError, match=match):
            QuantizedSource([path])

    load_changed(lambda t: t.update({"w.weight.absmax": t["w.weight.absmax"][:-1].clone()}),
                 r"tensor 'w.weight.absmax': U8 \[31\]; a NF4 weight of shape \[16, 128\] in blocks of 64 needs U8 \[32\]")
    load_changed(lambda t: t.pop("w.weight.nested_absmax"), r"the weight's nested_absmax .* is missing")
    load_changed(lambda t: t.update({"w.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b"{oops"),
                                                                                             dtype=torch.uint8)}),
                 "not valid JSON")
    state = json.loads(bytes(good["w.weight.quant_state.bitsandbytes__nf4"].tolist()))
    state["blocksize"] = 100
    load_changed(lambda t: t.update({"w.weight.quant_state.bitsandbytes__nf4": torch.tensor(
        list(json.dumps(state).encode()), dtype=torch.uint8)}), r"blocksize 100; bitsandbytes uses one of")


def test_four_step_pipeline_equals_diffusers_with_bitsandbytes_layers(wide, tiny_repo):
    from qistudio import ModelConfig, QwenImagePipeline
    from qistudio.ops.packing import patchify, unpatchify
    from tiny_models import reference_pipeline

    reference, path = wide
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(path)), ModelConfig(path=str(tiny_repo / "text_encoder")),
                       ModelConfig(path=str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors"))],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )  # fmt: skip
    theirs = reference_pipeline(tiny_repo, transformer=bnb_transformer(reference, path))
    height, width = 64, 96
    noise = torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = theirs(prompt="a lighthouse", negative_prompt="fog", true_cfg_scale=3.0, height=height,
                          width=width, num_inference_steps=4, latents=patchify(noise), output_type="latent").images
    got = pipe("a lighthouse", negative_prompt="fog", cfg_scale=3.0, height=height, width=width,
               num_inference_steps=4, noise=noise, cfg_norm_rescale=True, output_type="latent",
               progress_bar_cmd=lambda x: x)
    assert rel_err(got, unpatchify(expected, height // 16, width // 16)) <= 1e-4


def test_an_nf4_text_encoder_keeps_its_decoder_linears_quantized(tiny_repo, tmp_path):
    """transformers saves a 4-bit Qwen2.5-VL in the same layout: its decoder linears stay NF4, and the pipeline's
    result equals the one with those weights dequantised by bitsandbytes, saved as plain floats."""
    import shutil

    import bitsandbytes.functional as F

    from qistudio import ModelConfig, QwenImagePipeline
    from qistudio.memory.quant_linear import quantized_linears

    def in_decoder(name, tensor):
        return tensor.dim() == 2 and "language_model.layers." in name

    state = load_file(str(tiny_repo / "text_encoder" / "model.safetensors"))
    nf4, dense = tmp_path / "nf4", tmp_path / "dense"
    for folder in (nf4, dense):
        folder.mkdir()
        shutil.copy(tiny_repo / "text_encoder" / "config.json", folder)
    write_bnb_4bit(nf4 / "model.safetensors", state, quantize=in_decoder)
    dequantized = {}
    for name, tensor in state.items():
        if in_decoder(name, tensor):
            packed, quant_state = F.quantize_4bit(tensor, blocksize=64, quant_type="nf4")
            tensor = F.dequantize_4bit(packed, quant_state)
        dequantized[name] = tensor.contiguous()
    save_file(dequantized, str(dense / "model.safetensors"))

    def pipeline(text_encoder):
        return QwenImagePipeline.from_pretrained(
            torch_dtype=torch.float32, device="cpu",
            model_configs=[ModelConfig(path=str(tiny_repo / "transformer")), ModelConfig(path=str(text_encoder)),
                           ModelConfig(path=str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors"))],
            tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
        )  # fmt: skip

    quantized, plain = pipeline(nf4), pipeline(dense)
    assert len(quantized_linears(quantized.text_encoder)) == sum(in_decoder(k, v) for k, v in state.items())
    kwargs = dict(prompt="a red kite", negative_prompt="fog", height=48, width=64, num_inference_steps=2, seed=4,
                  output_type="latent", progress_bar_cmd=lambda x: x)
    assert rel_err(quantized(**kwargs), plain(**kwargs)) < 1e-6
