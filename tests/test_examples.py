"""The examples run as written, against the tiny repository laid out where the hub files would be downloaded."""

import runpy

from PIL import Image

from conftest import ROOT

EXAMPLES = ROOT / "examples"


def test_qwen_image_quick_start(tiny_repo, tmp_path, monkeypatch):
    models = tmp_path / "models"
    (models / "Qwen").mkdir(parents=True)
    (models / "Qwen" / "Qwen-Image").symlink_to(tiny_repo, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QISTUDIO_MODEL_BASE_PATH", str(models))
    monkeypatch.setenv("QISTUDIO_SKIP_DOWNLOAD", "1")  # the hub is never contacted
    monkeypatch.setenv("QISTUDIO_EXAMPLE_DEVICE", "cpu")
    monkeypatch.setenv("QISTUDIO_EXAMPLE_STEPS", "2")
    monkeypatch.setenv("QISTUDIO_EXAMPLE_SIZE", "64")
    namespace = runpy.run_path(str(EXAMPLES / "model_inference" / "Qwen-Image.py"), run_name="__main__")
    with Image.open(tmp_path / "image.jpg") as image:
        assert image.format == "JPEG" and image.size == (64, 64)
    assert namespace["pipe"].last_seed == 0
