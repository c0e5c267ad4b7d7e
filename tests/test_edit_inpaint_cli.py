"""`qistudio generate --edit-image PHOTO --inpaint-mask MASK`: edit inpainting from the command line, the same
image as the pipeline call it stands for."""

import numpy as np
from PIL import Image

import qistudio.conditioning.edit as edit
from qistudio.cli.main import main
from test_edit_parity import load_edit_pipe, random_image


def test_edit_inpainting_from_the_cli_equals_the_pipeline(tiny_repo, tmp_path, monkeypatch):
    monkeypatch.setattr(edit, "EDIT_LATENT_AREA", 96 * 96)  # a tiny model needs no 1024x1024 working area
    photo = random_image(64, 48, seed=8)
    photo.save(tmp_path / "photo.png")
    mask = Image.new("RGB", (64, 48))
    mask.paste((255, 255, 255), (32, 0, 64, 48))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = ["generate", "a red scarf", "--model", str(tiny_repo), "--edit-image", str(tmp_path / "photo.png"),
            "--inpaint-mask", str(tmp_path / "mask.png"), "--steps", "2", "--seed", "5", "--device", "cpu",
            "-o", str(out)]
    assert main(args) == 0
    pipe = load_edit_pipe(tiny_repo)
    expected = pipe("a red scarf", edit_image=photo, inpaint_mask=mask, seed=5, num_inference_steps=2,
                    progress_bar_cmd=lambda x: x)
    with Image.open(out) as written:
        assert written.size == expected.size == edit.size_at_area(96 * 96, 64 / 48)
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(expected))
