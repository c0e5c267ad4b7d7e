"""The examples run as written, against the tiny repository laid out where the hub files would be downloaded."""

import runpy

import pytest
from PIL import Image
from safetensors.torch import save_file

import qistudio.conditioning.edit as edit
from conftest import ROOT
from lora_files import peft_layout, random_pairs
from test_control import write_controlnet
from tiny_models import reference_dit

EXAMPLES = ROOT / "examples"


@pytest.fixture
def hub_on_disk(tiny_repo, tmp_path, monkeypatch):
    """models/Qwen/<repo> -> the tiny repository for every repository the examples name; the hub is never contacted."""
    models = tmp_path / "models"
    (models / "Qwen").mkdir(parents=True)
    for name in ("Qwen-Image", "Qwen-Image-Edit", "Qwen-Image-Edit-2509"):
        (models / "Qwen" / name).symlink_to(tiny_repo, target_is_directory=True)
    studio = models / "DiffSynth-Studio"
    studio.mkdir()
    (studio / "Qwen-Image-Distill-Full").symlink_to(tiny_repo / "transformer", target_is_directory=True)
    loras = ("Qwen-Image-Distill-LoRA", "Qwen-Image-Edit-Lowres-Fix", "Qwen-Image-EliGen", "Qwen-Image-EliGen-V2",
             "Qwen-Image-In-Context-Control-Union")
    for seed, name in enumerate(loras):
        (studio / name).mkdir()  # DiffSynth-Studio's own LoRA layout: <module>.lora_A.default.weight
        pairs = random_pairs(reference_dit(), seed=seed)
        save_file(peft_layout(pairs, adapter="default", alpha=None), str(studio / name / "model.safetensors"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QISTUDIO_MODEL_BASE_PATH", str(models))
    monkeypatch.setenv("QISTUDIO_SKIP_DOWNLOAD", "1")
    monkeypatch.setenv("QISTUDIO_EXAMPLE_DEVICE", "cpu")
    monkeypatch.setenv("QISTUDIO_EXAMPLE_STEPS", "2")
    monkeypatch.setenv("QISTUDIO_EXAMPLE_SIZE", "64")
    for kind in ("Canny", "Depth", "Inpaint"):  # tiny Blockwise ControlNets in the released layout
        (studio / f"Qwen-Image-Blockwise-ControlNet-{kind}").mkdir()
        write_controlnet(studio / f"Qwen-Image-Blockwise-ControlNet-{kind}" / "model.safetensors",
                         inpaint=kind == "Inpaint")
    monkeypatch.setattr(edit, "EDIT_LATENT_AREA", 128 * 128)  # a tiny model needs no 1024x1024 working area
    return tmp_path


def run_example(name: str, folder: str = "model_inference") -> dict:
    return runpy.run_path(str(EXAMPLES / folder / name), run_name="__main__")


def test_qwen_image_quick_start(hub_on_disk):
    namespace = run_example("Qwen-Image.py")
    with Image.open(hub_on_disk / "image.jpg") as image:
        assert image.format == "JPEG" and image.size == (64, 64)
    assert namespace["pipe"].last_seed == 0


def test_qwen_image_edit(hub_on_disk):
    run_example("Qwen-Image-Edit.py")
    with Image.open(hub_on_disk / "image1.jpg") as source, Image.open(hub_on_disk / "image2.jpg") as edited:
        assert source.size == (48, 64)
        assert edited.size == edit.size_at_area(128 * 128, 48 / 64)  # the edit image's aspect


def test_qwen_image_edit_lowres_fix(hub_on_disk):
    namespace = run_example("Qwen-Image-Edit-Lowres-Fix.py")
    assert [info.name for info in namespace["pipe"].list_loras()] == ["model"]
    with Image.open(hub_on_disk / "image_lowres.jpg") as low, Image.open(hub_on_disk / "image_highres.jpg") as high:
        assert low.size == (32, 16) and high.size == (64, 48)  # 512x384 -> 1024x768, scaled by 1/16


@pytest.mark.parametrize("name", ["Qwen-Image-Distill-Full.py", "Qwen-Image-Distill-LoRA.py"])
def test_qwen_image_distill(hub_on_disk, name):
    namespace = run_example(name)
    with Image.open(hub_on_disk / "image.jpg") as image:
        assert image.size == (64, 64)
    assert len(namespace["pipe"].list_loras()) == (1 if "LoRA" in name else 0)


def test_low_vram_examples(hub_on_disk, monkeypatch):
    """The low-VRAM scripts run (FP8 storage, planned memory) and stay close to the plain examples' images."""
    import numpy as np

    namespace = run_example("Qwen-Image.py", "model_inference_low_vram")
    pipe = namespace["pipe"]
    assert pipe.components.memory is not None and type(pipe.dit.transformer_blocks[0].attn.to_q).__name__ == "FP8Linear"
    with Image.open(hub_on_disk / "image.jpg") as image:
        low = np.asarray(image, dtype=np.float32)
    run_example("Qwen-Image.py")
    with Image.open(hub_on_disk / "image.jpg") as image:
        plain = np.asarray(image, dtype=np.float32)
    assert np.abs(low - plain).mean() < 8  # FP8 weights: the same picture within a few grey levels
    run_example("Qwen-Image-Edit.py", "model_inference_low_vram")
    with Image.open(hub_on_disk / "image2.jpg") as edited:
        assert edited.size == edit.size_at_area(128 * 128, 48 / 64)


@pytest.mark.parametrize("name, output", [("Qwen-Image-Distill-Full.py", "image.jpg"),
                                          ("Qwen-Image-Distill-LoRA.py", "image.jpg"),
                                          ("Qwen-Image-Edit-Lowres-Fix.py", "image_highres.jpg")])
def test_other_low_vram_examples(hub_on_disk, name, output):
    namespace = run_example(name, "model_inference_low_vram")
    assert namespace["pipe"].components.memory is not None
    with Image.open(hub_on_disk / output) as image:
        assert image.size[0] >= 48


@pytest.mark.parametrize("folder", ["model_inference", "model_inference_low_vram"])
@pytest.mark.parametrize("name", ["Qwen-Image-EliGen.py", "Qwen-Image-EliGen-V2.py"])
def test_eligen_examples(hub_on_disk, folder, name):
    namespace = run_example(name, folder)
    assert namespace["pipe"].last_request.entities.token_masks.shape == (3, 16)  # 3 entities on a 4x4 patch grid
    with Image.open(hub_on_disk / "image.jpg") as image:
        assert image.size == (64, 64)


@pytest.mark.parametrize("folder", ["model_inference", "model_inference_low_vram"])
@pytest.mark.parametrize("name", ["Qwen-Image-Blockwise-ControlNet-Canny.py", "Qwen-Image-Blockwise-ControlNet-Depth.py",
                                  "Qwen-Image-Blockwise-ControlNet-Inpaint.py",
                                  "Qwen-Image-In-Context-Control-Union.py"])
def test_control_examples(hub_on_disk, folder, name):
    namespace = run_example(name, folder)
    request = namespace["pipe"].last_request
    assert request.controlnet_inputs or request.context_image is not None
    with Image.open(hub_on_disk / "image.jpg") as image:
        assert image.size == (64, 64)
