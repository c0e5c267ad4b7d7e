"""Qwen-Image-2512: its hub id wherever a model id is taken, its examples as written, its published LoRA presets.

The examples run against the tiny repository laid out where the Qwen/Qwen-Image-2512 hub files would be downloaded
(the 2512 model is the base model retrained: same architecture, same layout).
"""

import argparse
import math
import runpy

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import ROOT
from lora_files import peft_layout, random_pairs
from qistudio import FlowMatchScheduler
from qistudio.presets import LORA_PRESETS, MODEL_PRESETS, lora_preset
from tiny_models import reference_dit

EXAMPLES = ROOT / "examples"
MODEL = "Qwen/Qwen-Image-2512"


@pytest.fixture
def hub_2512(tiny_repo, tmp_path, monkeypatch):
    """models/Qwen/Qwen-Image-2512 -> the tiny repository; the Lightning LoRA file in its published place."""
    models = tmp_path / "models"
    (models / "Qwen").mkdir(parents=True)
    for name in ("Qwen-Image-2512", "Qwen-Image"):  # training's default tokenizer comes from Qwen/Qwen-Image
        (models / "Qwen" / name).symlink_to(tiny_repo, target_is_directory=True)
    preset = LORA_PRESETS["Qwen-Image-2512-Lightning-4steps"]
    (models / preset.repository).mkdir(parents=True)
    # lightx2v ships the LoRA in the diffusers/PEFT layout (transformer.<module>.lora_A.weight).
    state = peft_layout(random_pairs(reference_dit(), seed=5), prefix="transformer.", alpha=None)
    save_file(state, str(models / preset.repository / preset.file))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QISTUDIO_MODEL_BASE_PATH", str(models))
    monkeypatch.setenv("QISTUDIO_SKIP_DOWNLOAD", "1")
    monkeypatch.setenv("QISTUDIO_EXAMPLE_DEVICE", "cpu")
    monkeypatch.setenv("QISTUDIO_EXAMPLE_STEPS", "2")
    monkeypatch.setenv("QISTUDIO_EXAMPLE_SIZE", "64")
    return tmp_path


def run_example(folder: str, name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / folder / name), run_name="__main__")


def test_inference_example_loads_every_component_from_the_2512_repository(hub_2512):
    namespace = run_example("model_inference", "Qwen-Image-2512.py")
    pipe = namespace["pipe"]
    assert set(pipe.components.sources.values()) == {MODEL}
    with Image.open(hub_2512 / "image.jpg") as image:
        assert image.size == (64, 64)


def test_low_vram_example(hub_2512):
    namespace = run_example("model_inference_low_vram", "Qwen-Image-2512.py")
    assert namespace["pipe"].components.memory is not None
    with Image.open(hub_2512 / "image.jpg") as image:
        assert image.size == (64, 64)


def test_lightning_example_uses_the_published_settings(hub_2512):
    namespace = run_example("model_inference", "Qwen-Image-2512-Lightning.py")
    pipe = namespace["pipe"]
    assert [info.name for info in pipe.list_loras()] == ["Qwen-Image-2512-Lightning-4steps-V1.0-bf16"]
    assert pipe.scheduler.template == "Qwen-Image-Lightning"
    request = pipe.last_request
    assert request.num_inference_steps == 4 and request.cfg_scale == 1.0 and not request.use_cfg
    with Image.open(hub_2512 / "image.jpg") as image:
        assert image.size == (64, 64)


def test_lora_training_script_and_its_validation(hub_2512, monkeypatch):
    from test_training_cli import script_arguments
    from test_training_data import write_dataset

    from qistudio.cli.main import main

    write_dataset(hub_2512 / "data" / "example_image_dataset", sizes=((48, 32),))
    args = script_arguments(EXAMPLES / "model_training" / "lora" / "Qwen-Image-2512.sh")
    assert args[args.index("--model_id_with_origin_paths") + 1].count(MODEL + ":") == 3
    assert main(args + ["--max_steps", "1", "--device", "cpu", "--dataset_num_workers", "0"]) == 0
    output = hub_2512 / "models" / "train" / "Qwen-Image-2512_lora"
    assert all(key.startswith("transformer.") for key in load_file(output / "step-1.safetensors"))
    monkeypatch.setenv("QISTUDIO_EXAMPLE_CHECKPOINT", str(output / "step-1.safetensors"))
    monkeypatch.setenv("QISTUDIO_EXAMPLE_SIZE", "32")
    namespace = run_example("model_training/validate_lora", "Qwen-Image-2512.py")
    assert len(namespace["pipe"].list_loras()) == 1 and (hub_2512 / "image.jpg").exists()


def test_cli_takes_the_hub_id_with_its_own_tokenizer(tmp_path):
    """`qistudio generate --model Qwen/Qwen-Image-2512` reads all files, the tokenizer too, from that repository."""
    from qistudio.cli.generate import model_configs

    settings = {"demo": False, "model": MODEL}
    args = argparse.Namespace(download_source="huggingface", model_dir=str(tmp_path), skip_download=True)
    configs, tokenizer, processor = model_configs(settings, args)
    assert {c.model_id for c in configs} == {tokenizer.model_id} == {MODEL}
    assert [c.origin_file_pattern for c in configs] == [
        "transformer/diffusion_pytorch_model*.safetensors", "text_encoder/model*.safetensors",
        "vae/diffusion_pytorch_model.safetensors"]
    assert processor is None
    preset = MODEL_PRESETS[MODEL]
    assert [(c.model_id, c.origin_file_pattern) for c in preset.model_configs()] == [
        (c.model_id, c.origin_file_pattern) for c in configs]


def test_lora_presets_name_known_schedules():
    for name, preset in LORA_PRESETS.items():
        assert preset.scheduler in FlowMatchScheduler.TEMPLATES, name
        assert preset.file.endswith(".safetensors") and preset.source
    # The Lightning schedule the 2512 LoRA was distilled for: fixed shift 3, no terminal stretch.
    sigmas = FlowMatchScheduler(lora_preset("Qwen-Image-2512-Lightning-4steps").scheduler).sigmas(4, 64 * 64)
    expected = [1.0, 0.9, 0.75, 0.5, 0.0]
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(sigmas.tolist(), expected))
    with pytest.raises(ValueError, match="unknown LoRA preset 'nope'; known: Qwen-Image-2512-Lightning-4steps"):
        lora_preset("nope")
