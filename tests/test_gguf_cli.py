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


# --- --text-encoder with either family, recorded in the PNG --------------------------------------------------------


def _safetensors(folder) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.safetensors"))


@pytest.fixture(scope="module")
def repo21(tmp_path_factory):
    from tiny_qwen21 import tiny_repository21

    return tiny_repository21(tmp_path_factory)


def test_qwen21_takes_a_qwen3_vl_text_encoder_file_and_records_it(repo21, tmp_path):
    """Qwen-Image 2.1's second ModelConfig is its text encoder too: --text-encoder replaces it, and --from-png
    remakes the image from the recorded files."""
    from PIL import Image

    from qistudio.imageio import read_png_parameters

    copied = shutil.copytree(repo21 / "text_encoder", tmp_path / "elsewhere")
    files = _safetensors(copied)
    model = shutil.copytree(repo21, tmp_path / "model", ignore=shutil.ignore_patterns("*.safetensors"),
                            dirs_exist_ok=False)
    for part in ("transformer", "vae"):
        for path in _safetensors(repo21 / part):
            shutil.copy(path, model / part)
    out, again = tmp_path / "fox.png", tmp_path / "again.png"
    assert cli("generate", "a red fox", "--model", model, *[f for path in files for f in ("--text-encoder", path)],
               "--steps", 1, "--size", "64x64", "--seed", 5, "--device", "cpu", "-o", out) == 0
    assert read_png_parameters(out)["text_encoder"] == files  # the model's own text_encoder/ has no weights
    assert cli("generate", "--from-png", out, "--device", "cpu", "-o", again) == 0
    with Image.open(out) as first, Image.open(again) as second:
        assert np.array_equal(np.asarray(first), np.asarray(second))


def test_a_text_encoder_of_the_other_family_is_refused_before_loading(repo21, tiny_repo, tmp_path, capsys):
    qwen25, qwen3 = _safetensors(tiny_repo / "text_encoder"), _safetensors(repo21 / "text_encoder")
    out = tmp_path / "out.png"
    assert cli("generate", "a cat", "--model", repo21, "--text-encoder", qwen25[0], "-o", out) == 2
    err = capsys.readouterr().err
    assert f"--text-encoder {qwen25[0]}: a " in err and "Qwen-Image 2.1 reads prompts with Qwen3-VL" in err
    assert "loading" not in err
    assert cli("generate", "a cat", "--model", tiny_repo, "--text-encoder", qwen3[0], "-o", out) == 2
    err = capsys.readouterr().err
    assert "Qwen3-VL, Qwen-Image 2.1's text encoder; this model reads prompts with Qwen2.5-VL" in err
    vae = tiny_repo / "vae" / "diffusion_pytorch_model.safetensors"
    assert cli("generate", "a cat", "--model", tiny_repo, "--text-encoder", vae, "-o", out) == 2
    assert "not a text encoder" in capsys.readouterr().err


def test_a_recorded_text_encoder_that_is_gone_is_named(tiny_repo, tmp_path, capsys):
    from PIL import Image

    from qistudio.imageio import save_png

    gone = tmp_path / "gone.gguf"
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "old.png",
                   {"prompt": "a cat", "model": str(tiny_repo), "text_encoder": [str(gone)]})
    assert cli("generate", "--from-png", png, "-o", tmp_path / "new.png") == 2
    assert f"--from-png {png}: {gone}: no such file" in capsys.readouterr().err


def test_vram_limit_loads_every_model_into_host_memory_and_text_encoder_replaces_the_second(tiny_repo, tmp_path):
    """Under --vram-limit the models rest in host memory until the plan moves them: a 12 GiB card could not
    hold a Q4_K_M DiT and text encoder together while they load."""
    import argparse

    from qistudio.cli.generate import base_model_configs

    text = _safetensors(tiny_repo / "text_encoder")
    settings = {"model": str(tiny_repo), "demo": False, "text_encoder": text}
    args = argparse.Namespace(vram_limit=12.0)
    configs, _, _ = base_model_configs(settings, args)
    assert [c.offload_device for c in configs] == ["cpu"] * 3 and configs[1].path == text
    plain, _, _ = base_model_configs(settings, argparse.Namespace(vram_limit=None))
    assert [c.offload_device for c in plain] == [None] * 3
