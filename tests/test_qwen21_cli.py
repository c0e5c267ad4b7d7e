"""`qistudio generate --model <Qwen-Image 2.1>`: 2.1's defaults, its processor folder, its refusals, and a PNG
equal to the pipeline's own image."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from qistudio import ModelConfig, QwenImagePipeline
from qistudio.cli.generate21 import is_qwen21_model, qwen21_settings
from qistudio.cli.main import main
from qistudio.imageio import read_png_parameters
from tiny_qwen21 import model_configs21, tiny_repository21


def cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return tiny_repository21(tmp_path_factory)


def test_the_png_is_the_pipelines_rgba_image(repo, tmp_path):
    out = tmp_path / "fox.png"
    assert cli("generate", "a red fox", "--model", repo, "--steps", 2, "--size", "64x96", "--seed", 5,
               "--device", "cpu", "-o", out) == 0
    parameters = read_png_parameters(out)
    assert (parameters["steps"], parameters["cfg"], parameters["size"]) == (2, 1.0, "64x96")  # no guidance: 2.1's
    pipe = QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=model_configs21(repo),
                                             tokenizer_config=None,
                                             processor_config=ModelConfig(path=str(repo / "processor")))
    expected = pipe("a red fox", height=96, width=64, num_inference_steps=2, seed=5,
                    progress_bar_cmd=lambda steps: steps)
    with Image.open(out) as image:
        assert image.mode == "RGBA" and image.size == (64, 96)
        assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_defaults_follow_the_model():
    settings = dict(model="Qwen/Qwen-Image-2.1", cfg=4.0)
    qwen21_settings(settings, {"model"}, error=None)
    assert (settings["steps"], settings["cfg"], settings["size"]) == (40, 1.0, (1024, 1024))
    given = dict(model="Qwen/Qwen-Image-2.1", cfg=3.0, steps=8, size=(512, 512), edit_images=["a.png"])
    qwen21_settings(given, {"model", "cfg", "steps", "size", "edit_images"}, error=None)
    assert (given["steps"], given["cfg"], given["size"]) == (8, 3.0, (512, 512))
    edit = dict(model="Qwen/Qwen-Image-2.1", cfg=4.0, edit_images=["a.png"])
    qwen21_settings(edit, {"model", "edit_images"}, error=None)
    assert "size" not in edit  # the last edit image's aspect, at 1024^2 pixels (the pipeline's rule)
    untouched = dict(model="Qwen/Qwen-Image", cfg=4.0)
    qwen21_settings(untouched, {"model"}, error=None)
    assert untouched == dict(model="Qwen/Qwen-Image", cfg=4.0)


def test_a_folder_is_recognised_by_its_classes(repo, tmp_path):
    assert is_qwen21_model(str(repo)) and is_qwen21_model("Qwen/Qwen-Image-2.1")
    assert not is_qwen21_model("Qwen/Qwen-Image-2512") and not is_qwen21_model(str(tmp_path))


@pytest.mark.parametrize("flags, message", [
    (["--cache", "compute-every-2"], "--cache: not supported with Qwen-Image 2.1"),
    (["--edit-image", "{image}"] * 11, "1 to 10 --edit-image"),
])
def test_20b_only_flags_are_refused_before_loading(repo, tmp_path, capsys, flags, message):
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(image)
    flags = [str(image) if f == "{image}" else f for f in flags]
    assert cli("generate", "a cat", "--model", repo, *flags, "-o", tmp_path / "out.png") == 2
    err = capsys.readouterr().err
    assert message in err and "loading" not in err
