"""The Layered and Edit-inpainting examples run as written, against tiny repositories where the hub files would
be downloaded (the hub is never contacted)."""

import runpy

import pytest
from PIL import Image

import qistudio.conditioning.layered as layered
from conftest import ROOT
from test_examples import hub_on_disk  # noqa: F401 - the fixture: models/Qwen/<repo> -> the tiny repository
from tiny_layered import write_tiny_layered

EXAMPLES = ROOT / "examples"


@pytest.fixture
def with_layered(hub_on_disk, tiny_repo, monkeypatch):  # noqa: F811 - the imported fixture
    write_tiny_layered(hub_on_disk / "models" / "Qwen" / "Qwen-Image-Layered", tiny_repo)
    monkeypatch.setattr(layered, "RESOLUTION_AREAS", {k: v // 64 for k, v in layered.RESOLUTION_AREAS.items()})
    return hub_on_disk


@pytest.mark.parametrize("folder", ["model_inference", "model_inference_low_vram"])
def test_layered_example(with_layered, folder):
    namespace = runpy.run_path(str(EXAMPLES / folder / "Qwen-Image-Layered.py"), run_name="__main__")
    assert len(namespace["layers"]) == 4
    size = layered.size_at_area(layered.RESOLUTION_AREAS[640], 864 / 480)  # the poster at the (scaled) 640 bucket
    for name in ("layer_1.png", "layer_4.png", "composite.png"):
        with Image.open(with_layered / name) as image:
            assert image.mode == "RGBA" and image.size == size
    assert (namespace["pipe"].components.memory is not None) == (folder == "model_inference_low_vram")


def test_edit_inpaint_example(hub_on_disk):  # noqa: F811
    runpy.run_path(str(EXAMPLES / "model_inference" / "Qwen-Image-Edit-Inpaint.py"), run_name="__main__")
    with Image.open(hub_on_disk / "image1.jpg") as source, Image.open(hub_on_disk / "image2.jpg") as edited:
        assert source.size == (48, 64)
        assert edited.size == layered.size_at_area(128 * 128, 48 / 64)  # the edit image's working size (tests')
