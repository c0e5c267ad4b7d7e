"""`qistudio quantize` (GGUF and NF4 files from our float weights) and `qistudio generate --model FILE.gguf`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from conftest import ROOT, rel_err  # noqa: E402
from gguf_files import reference_wide_dit  # noqa: E402
from lora_files import Inputs  # noqa: E402
from qistudio.cli.main import main  # noqa: E402
from qistudio.memory.quant_linear import QuantizedLinear  # noqa: E402
from qistudio.weights.build import load_model  # noqa: E402
from qistudio.weights.gguf_io import read_gguf_layout  # noqa: E402


def cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def bf16_dit(tmp_path_factory):
    """diffusers' wide tiny DiT saved in bfloat16 in two shards (as released checkpoints are), with its config;
    the returned model holds those bfloat16 weights in float32."""
    folder = tmp_path_factory.mktemp("bf16") / "transformer"
    reference = reference_wide_dit()
    reference.to(torch.bfloat16).save_pretrained(folder, max_shard_size="2MB")
    return reference.float(), folder


def test_quantize_q4_k_m_writes_a_gguf_every_reader_loads(bf16_dit, tmp_path):
    reference, folder = bf16_dit
    out = folder / "dit-Q4_K_M.gguf"  # beside config.json: the tiny DiT's RoPE axes are read from it
    assert cli("quantize", folder, out, "--type", "Q4_K_M") == 0
    tensors, metadata = read_gguf_layout(out)
    assert metadata["general.architecture"] == "qwen_image"
    types = {name: t.type_name for name, t in tensors.items()}
    # llama.cpp's rule with 2 blocks: block 1's value and down projections in Q6_K, the other block linears Q4_K.
    assert types["transformer_blocks.1.attn.to_v.weight"] == types["transformer_blocks.1.img_mlp.net.2.weight"] == "Q6_K"
    assert types["transformer_blocks.0.attn.to_v.weight"] == types["transformer_blocks.1.attn.to_q.weight"] == "Q4_K"
    assert types["img_in.weight"] == "BF16" and types["transformer_blocks.0.attn.to_q.bias"] == "F32"
    _, ours = load_model([out], dtype=torch.float32)
    assert isinstance(ours.transformer_blocks[1].attn.to_v, QuantizedLinear)
    inputs = Inputs()
    expected = inputs.diffusers(reference)
    assert rel_err(inputs.ours(ours), expected) < 0.1  # 4-bit weights of a random model: ~5% from bf16
    from diffusers import GGUFQuantizationConfig, QwenImageTransformer2DModel

    theirs = QwenImageTransformer2DModel.from_single_file(
        str(out), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=str(folder.parent),
        subfolder="transformer", torch_dtype=torch.float32)
    assert rel_err(inputs.ours(ours), inputs.diffusers(theirs.eval())) < 1e-5


def test_quantize_q8_0_writes_the_gguf_packages_bytes(bf16_dit, tmp_path):
    import gguf

    reference, folder = bf16_dit
    out = tmp_path / "dit-Q8_0.gguf"
    assert cli("quantize", folder, out, "--type", "Q8_0") == 0
    reader = gguf.GGUFReader(str(out))
    name = "transformer_blocks.0.img_mlp.net.0.proj.weight"
    stored = next(t for t in reader.tensors if t.name == name)
    weight = reference.get_parameter(name).detach().numpy()
    assert np.array_equal(np.array(stored.data), gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0))


def test_quantize_nf4_writes_bitsandbytes_bytes_and_loads(bf16_dit, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from test_nf4 import bnb_transformer

    reference, folder = bf16_dit
    out = tmp_path / "dit-nf4.safetensors"
    assert cli("quantize", folder, out, "--type", "NF4") == 0
    tensors = load_file(str(out))
    name = "transformer_blocks.1.attn.add_q_proj.weight"
    packed, state = bnb.functional.quantize_4bit(reference.get_parameter(name).detach(),
                                                 blocksize=64, quant_type="nf4")
    assert torch.equal(tensors[name], packed) and torch.equal(tensors[f"{name}.absmax"], state.absmax)
    _, ours = load_model([out], dtype=torch.float32)
    assert isinstance(ours.get_submodule(name.removesuffix(".weight")), QuantizedLinear)
    inputs = Inputs()
    theirs = bnb_transformer(reference, out)
    assert rel_err(inputs.ours(ours), inputs.diffusers(theirs)) < 1e-5


@pytest.mark.parametrize("args, message", [
    (["missing", "out.gguf", "--type", "Q8_0"], "SOURCE missing: no such file or folder"),
    (["{src}", "out.safetensors", "--type", "Q4_K_M"], "a Q4_K_M file ends in .gguf"),
    (["{src}", "out.gguf", "--type", "NF4"], "a NF4 file ends in .safetensors"),
    (["{src}", "{src}", "--type", "NF4"], "exists; add --overwrite"),
    (["{src}", "out.gguf", "--type", "Q3_K"], "invalid choice: 'Q3_K'"),
])  # fmt: skip
def test_bad_quantize_arguments_fail_before_reading(args, message, tmp_path, capsys):
    source = tmp_path / "dit.safetensors"
    source.write_bytes(b"not read")
    args = [a.format(src=source) for a in args]
    assert cli("quantize", *args) == 2
    assert message in capsys.readouterr().err


def test_quantize_refuses_a_model_that_is_not_a_dit(tiny_repo, tmp_path, capsys):
    assert cli("quantize", tiny_repo / "vae", tmp_path / "vae.gguf", "--type", "Q8_0") == 1
    assert "holds a Qwen-Image VAE (diffusers); qistudio quantize writes DiT checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "vae.gguf").exists()


def test_quantize_help_imports_no_model_code(tmp_path):
    from test_cli import _IMPORTS_PROBE

    result = subprocess.run([sys.executable, "-c", _IMPORTS_PROBE, "quantize", "in", "out.gguf", "--type", "Q8_0"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "imported: [] status: 2" in result.stdout, result.stdout + result.stderr


def test_generate_with_a_gguf_model_file_equals_the_pipeline(bf16_dit, tiny_repo, tmp_path):
    """--model FILE.gguf: the DiT from the file, the rest from the base hub model's files (--model-dir)."""
    from PIL import Image

    from qistudio import ModelConfig, QwenImagePipeline

    _, folder = bf16_dit
    dit = folder / "dit-Q8_0.gguf"
    assert cli("quantize", folder, dit, "--type", "Q8_0", "--overwrite") == 0
    base = tmp_path / "models" / "Qwen" / "Qwen-Image"
    for part in ("text_encoder", "vae", "tokenizer"):
        shutil.copytree(tiny_repo / part, base / part)
    out = tmp_path / "gguf.png"
    assert cli("generate", "a small boat", "--model", dit, "--model-dir", tmp_path / "models", "--skip-download",
               "--size", "64x48", "--steps", 2, "--seed", 3, "--device", "cpu", "-o", out) == 0
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(dit)), ModelConfig(path=str(tiny_repo / "text_encoder")),
                       ModelConfig(path=str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors"))],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )  # fmt: skip
    expected = pipe("a small boat", seed=3, num_inference_steps=2, height=48, width=64)
    with Image.open(out) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))


def test_the_quantize_parsers_types_are_the_librarys():
    """The parser names them without importing torch; they must stay equal."""
    from qistudio.cli import quantize
    from qistudio.weights.quantize_dit import QUANT_TYPES

    assert quantize.TYPES == QUANT_TYPES
