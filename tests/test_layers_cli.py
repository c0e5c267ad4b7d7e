"""`qistudio layers IMAGE --layers N -o DIR`: refusals before any model loads, and a run on the tiny Layered model."""

import re

import numpy as np
import pytest
from PIL import Image

import qistudio.conditioning.caption as caption
import qistudio.conditioning.layered as layered
from qistudio.cli import layers as layers_cli
from qistudio.cli.main import main
from qistudio.imageio import read_png_parameters
from tiny_layered import write_tiny_layered


@pytest.fixture(scope="module")
def layered_repo(tiny_repo, tmp_path_factory):
    return write_tiny_layered(tmp_path_factory.mktemp("Qwen-Image-Layered"), tiny_repo)


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(layered, "RESOLUTION_AREAS", {k: v // 64 for k, v in layered.RESOLUTION_AREAS.items()})
    monkeypatch.setattr(caption, "MAX_NEW_TOKENS", 8)


def picture(path, mode="RGB", size=(96, 64)):
    channels = len(mode)
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(path)
    return path


@pytest.mark.parametrize("extra, message", [
    (["--layers", "0"], "argument --layers: must be >= 1, got 0"),
    (["--layers", "-2"], "argument --layers: must be >= 1, got -2"),
    (["--layers", "100"], r"layers must be an integer in \[1, 64\], got 100"),
    (["--resolution", "512"], r"argument --resolution: invalid choice: 512"),
    (["--cfg", "nan"], "argument --cfg: must be a finite number"),
])  # fmt: skip
def test_bad_arguments_stop_before_loading(tmp_path, capsys, extra, message):
    image = picture(tmp_path / "in.png")
    with pytest.raises(SystemExit) as exit_info:
        main(["layers", str(image), "-o", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_unreadable_image_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["layers", str(tmp_path / "missing.png"), "-o", str(tmp_path / "out")])
    assert "image: cannot read image" in capsys.readouterr().err


def test_cli_resolutions_are_the_models():
    assert tuple(layered.RESOLUTION_AREAS) == layers_cli.RESOLUTIONS


def test_layers_written_with_their_composite(layered_repo, tmp_path, capsys, small):
    image = picture(tmp_path / "in.png", "RGB")
    out = tmp_path / "out"
    assert main(["layers", str(image), "--layers", "2", "-o", str(out), "--model", str(layered_repo), "--steps", "1",
                 "--seed", "3", "--prompt", "a red kite", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "is RGB, not RGBA; it is converted to RGBA" in captured.err
    assert "the composite differs from the input by" in captured.out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["composite.png", "layer-1.png", "layer-2.png"]
    with Image.open(out / "layer-1.png") as layer:
        assert layer.mode == "RGBA" and layer.size == (96, 64)  # the (scaled) 640 bucket at 3:2
    parameters = read_png_parameters(out / "layer-2.png")
    assert parameters["prompt"] == "a red kite" and parameters["layer"] == 2 and parameters["seed"] == 3


def test_without_a_prompt_the_caption_is_used_and_stored(layered_repo, tmp_path, capsys, small):
    image = picture(tmp_path / "in.png", "RGBA", size=(64, 64))
    out = tmp_path / "out"
    assert main(["layers", str(image), "--layers", "1", "-o", str(out), "--model", str(layered_repo), "--steps", "1",
                 "--en", "--cfg", "1", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    caption_line = next(line for line in printed.splitlines() if line.startswith("caption: "))
    assert read_png_parameters(out / "layer-1.png")["prompt"] == caption_line[len("caption: "):]
