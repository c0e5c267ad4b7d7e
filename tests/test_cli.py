"""`qistudio generate` end to end on tiny models: demo, reproduction from a PNG, local folders, clear failures."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from qistudio.cli.main import main
from qistudio.demo import MARKER, default_demo_dir, write_demo_model
from qistudio.imageio import read_png_parameters
from qistudio.weights.hub import HuggingFaceClient, ModelScopeClient


def cli(*args: str) -> int:
    """main(args) as the console script sees it: argparse's own errors exit through SystemExit."""
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory, demo_model):
    """An XDG cache folder whose qistudio/demo is the session's demo model as write_demo_model left it (hard links
    to the same files)."""
    home = tmp_path_factory.mktemp("cache")
    shutil.copytree(demo_model, home / "qistudio" / "demo", copy_function=os.link)
    return home


@pytest.fixture
def demo_env(cache_home, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    return cache_home


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_demo_is_cached_and_loads_under_real_names(cache_home, demo_model, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    folder = default_demo_dir()
    marker = (folder / MARKER).stat().st_mtime_ns
    assert write_demo_model(folder) == folder and (folder / MARKER).stat().st_mtime_ns == marker  # reused
    index = json.loads((folder / "text_encoder" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.embed_tokens.weight" in index and any(k.startswith("visual.") for k in index)
    assert json.loads((folder / "transformer" / "config.json").read_text())["axes_dims_rope"] == [8, 12, 12]
    assert not list(demo_model.parent.glob(".demo.*.tmp"))  # the write's staging folder is gone


def test_demo_writes_png_with_parameters(demo_env, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert cli("generate", "a red fox", "--demo", "--seed", 7, "-o", out) == 0
    assert "seed: 7" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (256, 256)
    params = read_png_parameters(out)
    assert params["prompt"] == "a red fox" and params["seed"] == 7 and params["steps"] == 8
    assert params["size"] == "256x256" and params["demo"] is True and params["dtype"] == "float32"
    assert params["cfg"] == 4.0 and params["strength"] == 1.0


def test_from_png_reproduces_and_flags_override(demo_env, tmp_path, capsys):
    first, again, changed = tmp_path / "first.png", tmp_path / "again.png", tmp_path / "changed.png"
    assert cli("generate", "a lighthouse", "--demo", "--size", "128x64", "--steps", 3, "-o", first) == 0
    seed = read_png_parameters(first)["seed"]  # drawn at random and stored
    assert f"seed: {seed}" in capsys.readouterr().out
    assert cli("generate", "--from-png", first, "-o", again) == 0
    assert np.array_equal(pixels(first), pixels(again))
    assert read_png_parameters(again) == read_png_parameters(first)
    assert cli("generate", "--from-png", first, "--steps", 2, "--negative", "fog", "-o", changed) == 0
    params = read_png_parameters(changed)
    assert params["steps"] == 2 and params["negative"] == "fog" and params["seed"] == seed
    assert params["size"] == "128x64" and pixels(changed).shape == (64, 128, 3)
    assert not np.array_equal(pixels(first), pixels(changed))


def test_local_folder_matches_the_pipeline(tiny_repo, tiny_pipe, tmp_path):
    out = tmp_path / "local.png"
    assert cli("generate", "a small boat", "--model", tiny_repo, "--size", "64x48", "--steps", 2,
               "--seed", 3, "--negative", "blur", "-o", out) == 0
    expected = tiny_pipe("a small boat", negative_prompt="blur", seed=3, num_inference_steps=2, height=48, width=64)
    assert np.array_equal(pixels(out), np.asarray(expected))
    assert read_png_parameters(out)["model"] == str(tiny_repo.resolve())


def test_image_to_image_matches_the_pipeline(tiny_repo, tiny_pipe, tmp_path):
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "img2img.png"
    assert cli("generate", "a boat", "--model", tiny_repo, "--input-image", source, "--strength", 0.5,
               "--steps", 4, "--seed", 5, "-o", out) == 0
    expected = tiny_pipe("a boat", input_image=Image.open(source), denoising_strength=0.5, seed=5,
                         num_inference_steps=4, height=48, width=64)  # size defaults to the input image's
    assert np.array_equal(pixels(out), np.asarray(expected))
    params = read_png_parameters(out)
    assert params["strength"] == 0.5 and params["input_image"] == str(source.resolve())


def test_missing_local_folder(tmp_path, capsys):
    assert cli("generate", "x", "--model", tmp_path / "nowhere" / "Qwen-Image", "-o", tmp_path / "o.png") == 1
    err = capsys.readouterr().err
    assert "no such model folder" in err and "transformer/ text_encoder/ vae/ tokenizer/" in err
    assert "Traceback" not in err
    partial = tmp_path / "partial"
    (partial / "transformer").mkdir(parents=True)
    assert cli("generate", "x", "--model", partial, "-o", tmp_path / "o.png") == 1
    assert "has no text_encoder/, vae/, tokenizer/" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def _offline(*args, **kwargs):
    raise ConnectionError("network is unreachable")


@pytest.mark.parametrize("source", ["modelscope", "huggingface"])
def test_offline_hub_says_how_to_use_local_files(source, tmp_path, monkeypatch, capsys):
    for client in (ModelScopeClient, HuggingFaceClient):  # stub only the network
        monkeypatch.setattr(client, "list_files", _offline)
        monkeypatch.setattr(client, "open_range", _offline)
    code = cli("generate", "x", "--download-source", source, "--model-dir", tmp_path / "models",
               "-o", tmp_path / "o.png")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "could not load the model 'Qwen/Qwen-Image'" in err and "network is unreachable" in err
    assert "--model /path/to/Qwen-Image" in err and "transformer/ text_encoder/ vae/ tokenizer/" in err


def test_skip_download_with_nothing_downloaded(tmp_path, capsys):
    code = cli("generate", "x", "--skip-download", "--model-dir", tmp_path / "models", "-o", tmp_path / "o.png")
    err = capsys.readouterr().err
    assert code == 1 and "no file under" in err and "--model /path/to/Qwen-Image" in err


@pytest.mark.parametrize("args, message", [
    (["--size", "12x"], "expected WIDTHxHEIGHT"),
    (["--size", "0x64"], "must be in [16, 16384]"),
    (["--steps", "0"], "must be >= 1"),
    (["--steps", "two"], "expected a whole number"),
    (["--strength", "1.5"], "must be in (0, 1]"),
    (["--strength", "0.5"], "--strength needs --input-image"),
    (["--input-image", "missing.png"], "cannot read image"),
    (["--dtype", "float64"], "invalid choice"),
    (["--demo"], "give --demo or --model, not both"),
    (["-o", "out.jpg"], "must be a .png"),
    (["--from-png", "missing.png"], "--from-png missing.png"),
])  # fmt: skip
def test_bad_arguments_fail_before_loading(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # A model folder that does not exist: had loading started, its error would show instead.
    code = cli("generate", "x", "--model", tmp_path / "absent", *args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "absent" not in err.split("error:")[-1]


def test_no_prompt_and_no_command(tmp_path, capsys):
    assert cli("generate", "-o", tmp_path / "o.png") == 2
    assert "a prompt is needed" in capsys.readouterr().err
    assert cli() == 2 and "generate" in capsys.readouterr().err


def test_module_entry_point(cache_home, tmp_path):
    out = tmp_path / "cli.png"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "qistudio.cli.main", "generate", "a kite", "--demo", "--size", "64x64",
         "--steps", "2", "--seed", "1", "-o", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "seed: 1" in result.stdout and "denoising" in result.stderr  # the progress bar
    assert read_png_parameters(out)["size"] == "64x64"
    assert torch.tensor(pixels(out)).shape == (64, 64, 3)


def _random_png(path, width, height, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def test_edit_matches_the_pipeline(tiny_repo, tmp_path, monkeypatch):
    import qistudio.conditioning.edit as edit

    monkeypatch.setattr(edit, "EDIT_LATENT_AREA", 128 * 128)  # a tiny model needs no 1024x1024 working area
    from qistudio import ModelConfig, QwenImagePipeline

    source = _random_png(tmp_path / "photo.png", 96, 64)
    out = tmp_path / "edited.png"
    assert cli("generate", "make it night", "--model", tiny_repo, "--edit-image", source, "--steps", 2,
               "--seed", 4, "-o", out) == 0
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(tiny_repo / name)) for name in ("transformer", "text_encoder", "vae")],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
        processor_config=ModelConfig(path=str(tiny_repo / "processor")),
    )  # fmt: skip
    expected = pipe("make it night", edit_image=Image.open(source), seed=4, num_inference_steps=2)
    assert expected.size == edit.size_at_area(128 * 128, 96 / 64)  # the edit image's aspect, no --size
    assert np.array_equal(pixels(out), np.asarray(expected))
    params = read_png_parameters(out)
    assert params["edit_images"] == [str(source.resolve())] and params["size"] == "160x96"
    # Two images: the "Picture k" template, and the output takes the last image's aspect.
    two = tmp_path / "two.png"
    second = _random_png(tmp_path / "second.png", 64, 96, seed=1)
    assert cli("generate", "combine them", "--model", tiny_repo, "--edit-image", source, "--edit-image", second,
               "--steps", 2, "--seed", 4, "--size", "64x64", "-o", two) == 0
    expected = pipe("combine them", edit_image=[Image.open(source), Image.open(second)], seed=4,
                    num_inference_steps=2, height=64, width=64)
    assert np.array_equal(pixels(two), np.asarray(expected))


def test_demo_edit_and_bad_edit_image(demo_env, tmp_path, capsys, monkeypatch):
    import qistudio.conditioning.edit as edit

    # The demo's output size comes from its own 256x256 area; the edit image's working copies need no 1024x1024
    # (at that size the tiny vision tower and VAE took ~10 s of CPU).
    monkeypatch.setattr(edit, "EDIT_LATENT_AREA", 128 * 128)
    source = _random_png(tmp_path / "wide.png", 128, 64)
    out = tmp_path / "demo-edit.png"
    assert cli("generate", "add snow", "--demo", "--edit-image", source, "--steps", 1, "-o", out) == 0
    with Image.open(out) as image:
        assert image.size == (352, 192)  # 256x256 area at the edit image's 2:1 aspect, sides multiples of 32
    assert cli("generate", "x", "--demo", "--edit-image", tmp_path / "missing.png", "-o", out) == 2
    assert "edit image: cannot read image" in capsys.readouterr().err


def test_lora_and_lightning_scheduler_match_the_pipeline(tiny_repo, tiny_pipe, tmp_path):
    from safetensors.torch import save_file

    from lora_files import down_up_layout, random_pairs
    from qistudio import FlowMatchScheduler

    lora = tmp_path / "lightning.safetensors"
    save_file(down_up_layout(random_pairs(tiny_pipe.dit, seed=5)), str(lora))
    out = tmp_path / "lora.png"
    assert cli("generate", "a kite", "--model", tiny_repo, "--size", "64x48", "--steps", 4, "--cfg", 1, "--seed", 2,
               "--lora", f"{lora}:0.7", "--scheduler", "Qwen-Image-Lightning", "-o", out) == 0
    tiny_pipe.load_lora(tiny_pipe.dit, str(lora), alpha=0.7)
    tiny_pipe.scheduler = FlowMatchScheduler("Qwen-Image-Lightning")
    try:
        expected = tiny_pipe("a kite", seed=2, num_inference_steps=4, cfg_scale=1.0, height=48, width=64)
    finally:
        tiny_pipe.clear_lora()
        tiny_pipe.scheduler = FlowMatchScheduler()
    assert np.array_equal(pixels(out), np.asarray(expected))
    params = read_png_parameters(out)
    assert params["loras"] == [f"{lora.resolve()}:0.7"] and params["scheduler"] == "Qwen-Image-Lightning"
    assert cli("generate", "x", "--model", tiny_repo, "--lora", tmp_path / "none.safetensors", "-o", out) == 2


def test_entities_match_the_pipeline(tiny_repo, tiny_pipe, tmp_path, capsys):
    left, right = Image.new("RGB", (64, 48)), Image.new("RGB", (32, 32))
    left.paste((255, 255, 255), (0, 0, 32, 48))
    right.paste((255, 255, 255), (16, 0, 32, 32))
    left.save(tmp_path / "left.png"), right.save(tmp_path / "right.png")
    out = tmp_path / "eligen.png"
    assert cli("generate", "a park", "--model", tiny_repo, "--size", "64x48", "--steps", 2, "--seed", 8,
               "--entity", "a dog", "--entity-mask", tmp_path / "left.png",
               "--entity", "a red bench", "--entity-mask", tmp_path / "right.png", "-o", out) == 0
    expected = tiny_pipe("a park", seed=8, num_inference_steps=2, height=48, width=64,
                         eligen_entity_prompts=["a dog", "a red bench"], eligen_entity_masks=[left, right])
    assert np.array_equal(pixels(out), np.asarray(expected))
    assert read_png_parameters(out)["entities"] == ["a dog", "a red bench"]
    assert cli("generate", "x", "--model", tiny_repo, "--entity", "a", "-o", out) == 2
    assert "1 --entity prompts but 0 --entity-mask" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "black.png")
    assert cli("generate", "x", "--model", tiny_repo, "--entity", "a", "--entity-mask", tmp_path / "black.png",
               "-o", out) == 2
    assert "is empty" in capsys.readouterr().err


def test_controls_inpaint_and_context_match_the_pipeline(tiny_repo, tmp_path, capsys):
    from qistudio import ControlNetInput, ModelConfig, QwenImagePipeline
    from qistudio.annotators import canny
    from test_control import write_controlnet

    photo = _random_png(tmp_path / "photo.png", 64, 48, seed=3)
    mask = Image.new("RGB", (64, 48))
    mask.paste((255, 255, 255), (0, 0, 32, 48))
    mask.save(tmp_path / "mask.png")
    canny_net = write_controlnet(tmp_path / "canny.safetensors")
    inpaint_net = write_controlnet(tmp_path / "inpaint.safetensors", inpaint=True, seed=1)
    out = tmp_path / "control.png"
    assert cli("generate", "a street", "--model", tiny_repo, "--size", "64x48", "--steps", 2, "--seed", 9,
               "--control", f"canny:{photo}:0.8", "--control", f"inpaint:{photo}", "--inpaint-mask", tmp_path / "mask.png",
               "--input-image", photo, "--strength", 1, "--controlnet", f"canny={canny_net}",
               "--controlnet", f"inpaint={inpaint_net}", "-o", out) == 0
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[*(ModelConfig(path=str(tiny_repo / n)) for n in ("transformer", "text_encoder", "vae")),
                       ModelConfig(path=str(canny_net)), ModelConfig(path=str(inpaint_net))],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )  # fmt: skip
    source, mask_image = Image.open(photo).convert("RGB"), Image.open(tmp_path / "mask.png").convert("RGB")
    expected = pipe("a street", seed=9, num_inference_steps=2, height=48, width=64, input_image=source,
                    inpaint_mask=mask_image, blockwise_controlnet_inputs=[
                        ControlNetInput(image=canny(source), scale=0.8, controlnet_id=0),
                        ControlNetInput(image=source, controlnet_id=1, inpaint_mask=mask_image)])
    assert np.array_equal(pixels(out), np.asarray(expected))
    params = read_png_parameters(out)
    assert params["controls"] == [f"canny:{photo.resolve()}:0.8", f"inpaint:{photo.resolve()}:1"]
    context = tmp_path / "context.png"
    assert cli("generate", "a street", "--model", tiny_repo, "--size", "64x48", "--steps", 1, "--seed", 9,
               "--context-image", photo, "-o", context) == 0
    assert read_png_parameters(context)["context_image"] == str(photo.resolve())
    assert cli("generate", "x", "--model", tiny_repo, "--control", f"inpaint:{photo}", "-o", out) == 2
    assert "needs --inpaint-mask" in capsys.readouterr().err
    assert cli("generate", "x", "--model", tiny_repo, "--control", "blur:x.png", "-o", out) == 2


def test_speed_and_memory_flags_match_the_pipeline(tiny_repo, tmp_path, monkeypatch):
    """--fp8 --vram-limit 0 --compile (with a LoRA) equals the same calls on the pipeline; they are not stored in
    the PNG (how it ran, not what it drew)."""
    from safetensors.torch import save_file

    from lora_files import down_up_layout, random_pairs
    from qistudio import ModelConfig, QwenImagePipeline
    from qistudio import compile as compile_module

    traced = []
    real_compile = compile_module.compile_repeated_blocks
    # Traced (fullgraph) without code generation: the CPU has no compiler to spare in tests.
    monkeypatch.setattr(compile_module, "compile_repeated_blocks",
                        lambda model, mode=None, dynamic=None: traced.append(
                            real_compile(model, mode, dynamic, backend="aot_eager")))

    def load():
        return QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            ModelConfig(path=sorted(str(p) for p in (tiny_repo / "transformer").glob("*.safetensors"))),
            ModelConfig(path=str(tiny_repo / "text_encoder")),
            ModelConfig(path=str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors")),
        ], tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")))

    pipe = load()
    lora = tmp_path / "style.safetensors"
    save_file(down_up_layout(random_pairs(pipe.dit, seed=6)), str(lora))
    out = tmp_path / "fast.png"
    assert cli("generate", "a lighthouse", "--model", tiny_repo, "--size", "64x48", "--steps", 2, "--seed", 4,
               "--device", "cpu", "--dtype", "float32", "--lora", f"{lora}:0.5", "--fp8", "--vram-limit", 0,
               "--compile", "-o", out) == 0
    assert len(traced) == 1
    pipe.enable_fp8_computation()
    pipe.load_lora(pipe.dit, str(lora), alpha=0.5)
    pipe.enable_vram_management(vram_limit=0)
    expected = pipe("a lighthouse", seed=4, num_inference_steps=2, height=48, width=64)
    assert np.array_equal(pixels(out), np.asarray(expected))
    plain = load()("a lighthouse", seed=4, num_inference_steps=2, height=48, width=64)
    assert not np.array_equal(np.asarray(plain), np.asarray(expected))  # FP8 storage and the LoRA did change it
    assert not {"fp8", "vram_limit", "compile"} & set(read_png_parameters(out))


@pytest.mark.parametrize("args, message", [
    (["--vram-limit", "-1"], "must be >= 0 GiB"),
    (["--vram-limit", "lots"], "expected GiB as a number"),
    (["--attention", "xformers"], "invalid choice"),
])  # fmt: skip
def test_bad_speed_flags_fail_before_loading(args, message, tmp_path, capsys):
    code = cli("generate", "x", "--model", tmp_path / "absent", *args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "absent" not in err.split("error:")[-1]


def test_attention_backend_that_cannot_run_here_fails_before_loading(tmp_path, capsys):
    from qistudio.ops.attention import available_backends, set_attention_backend

    missing = next(name for name in ("flash4", "cudnn_fp8", "sage", "flash3") if name not in available_backends())
    try:
        code = cli("generate", "x", "--model", tmp_path / "absent", "--attention", missing)
    finally:
        set_attention_backend(None)
    err = capsys.readouterr().err
    assert code == 2 and f"--attention {missing}" in err and "cannot run here" in err


# ------------------------------------------------------------------------------------ answering at once

HEAVY = ("torch", "transformers", "diffusers", "numpy", "PIL")
# Runs the console entry point with ARGV and prints which heavy packages were imported by the time it exited.
_IMPORTS_PROBE = """
import sys
from qistudio.cli.main import main
try:
    status = main(sys.argv[1:])
except SystemExit as e:
    status = e.code
print("imported:", sorted({name.split(".")[0] for name in sys.modules} & set(%r)), "status:", status)
""" % (HEAVY,)


@pytest.mark.parametrize("args", [
    ["--help"], ["generate", "--help"], ["validate", "--help"], ["convert-lora", "--help"], ["train", "--help"],
    ["generate", "x", "--steps", "0"], ["generate", "x", "--cfg", "nan"], ["generate", "x", "-o", "out.jpg"],
    ["generate", "x", "-o", "no/such/folder/out.png"], ["generate", "--demo"], ["validate", "missing.safetensors"],
    ["convert-lora", "in.safetensors", "out.safetensors", "--to", "kohya"],
])  # fmt: skip
def test_help_and_argument_errors_import_no_model_code(args, tmp_path):
    """--help and argument errors answer at once: torch (seconds to import) and the models stay unloaded."""
    result = subprocess.run([sys.executable, "-c", _IMPORTS_PROBE, *args], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "imported: [] status: " in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.rstrip().endswith("status: 0" if "--help" in args else "status: 2")


def test_the_parsers_choices_are_the_librarys():
    """The parsers name these without importing the library (which imports torch); they must stay equal."""
    from qistudio.cli import convert_lora, generate, speed
    from qistudio.lora import FORMATS
    from qistudio.ops.attention import _BACKENDS
    from qistudio.sampling.schedule import FlowMatchScheduler
    from qistudio.weights.model_config import DOWNLOAD_SOURCES

    assert generate.SCHEDULERS == tuple(FlowMatchScheduler.TEMPLATES)
    assert generate.DOWNLOAD_SOURCES == DOWNLOAD_SOURCES
    assert convert_lora.FORMATS == FORMATS
    assert sorted(speed.ATTENTION_BACKENDS) == sorted(_BACKENDS)
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in generate.DTYPES)


def test_package_names_load_on_first_use():
    import qistudio
    from qistudio.pipeline import QwenImagePipeline

    assert qistudio.QwenImagePipeline is QwenImagePipeline and set(qistudio.__all__) <= set(dir(qistudio))
    with pytest.raises(AttributeError, match="no attribute 'Pipeline'"):
        qistudio.Pipeline


# ------------------------------------------------------------------------------------ -o and the umask


def test_output_is_checked_before_loading(tmp_path, capsys):
    (tmp_path / "taken.png").mkdir()
    cases = [
        (tmp_path / "no" / "such" / "o.png", "does not exist"),
        (tmp_path / "taken.png", "is a folder"),
        (tmp_path / "o.PNG.txt", "must be a .png"),
    ]
    if sys.platform == "linux" and os.path.isdir("/sys"):  # a folder even root cannot write into
        cases.append(("/sys/o.png", "cannot write into the folder /sys"))
    for output, message in cases:
        assert cli("generate", "x", "--model", tmp_path / "absent", "-o", output) == 2
        err = capsys.readouterr().err
        assert message in err and "absent" not in err.split("error:")[-1]


def test_the_png_gets_the_umask_mode(demo_env, tmp_path):
    previous = os.umask(0o022)
    try:
        assert cli("generate", "x", "--demo", "--size", "32x32", "--steps", 1, "--seed", 1, "-o", tmp_path / "o.png") == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "o.png").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]


def test_a_missing_optional_package_names_its_extra():
    from qistudio.cli.main import EXTRAS, one_line

    assert one_line(ModuleNotFoundError("No module named 'accelerate'", name="accelerate")) == (
        "No module named 'accelerate' (pip install 'qistudio[train]')")
    said = "LoRA training needs peft: pip install 'qistudio[train]'"
    assert one_line(ImportError(said, name="peft")) == said  # named once
    assert one_line(ValueError("3 tensors do not fit:\nx\ny")) == "3 tensors do not fit: x; y"
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS.values()) <= set(extras)
