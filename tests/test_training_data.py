"""Training data and loss schedule: metadata formats, the reference's image sizing, skipped images, sigma tables."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qistudio.training import DataConfig, LossConfig
from qistudio.training.data import ImageDataset, Skipped, crop_and_resize, epoch_order, read_metadata, skip_report
from qistudio.training.timesteps import bsmntw_weight, draw_sigma, sigma_table


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def write_dataset(folder: Path, sizes=((48, 32), (32, 32), (40, 56)), fmt: str = "csv", extra_rows=()) -> Path:
    """Images img<k>.png of the given (width, height) with prompts; returns the metadata file."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (w, h) in enumerate(sizes):
        write_image(folder / f"img{k}.png", w, h, seed=k)
        rows.append({"image": f"img{k}.png", "prompt": f"prompt {k}, with a comma"})
    rows += list(extra_rows)
    if fmt == "csv":
        import csv

        path = folder / "metadata.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "json":
        path = folder / "metadata.json"
        path.write_text(json.dumps(rows))
    else:
        path = folder / "metadata.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_metadata_formats_read_alike(tmp_path, fmt):
    path = write_dataset(tmp_path, fmt=fmt, extra_rows=[{"image": "img0.png", "prompt": "x", "edit_image": "img1.png"}])
    rows = read_metadata(path)
    assert [r["image"] for r in rows] == ["img0.png", "img1.png", "img2.png", "img0.png"]
    assert rows[0]["prompt"] == "prompt 0, with a comma"
    assert rows[3]["edit_image"] == "img1.png"  # extra columns pass through


def test_metadata_errors_say_what_is_wrong(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps([{"image": "a.png"}]))
    with pytest.raises(ValueError, match="needs an 'image' and a 'prompt'"):
        read_metadata(tmp_path / "m.json")
    (tmp_path / "m.txt").write_text("")
    with pytest.raises(ValueError, match=r"\.csv, \.json or \.jsonl"):
        read_metadata(tmp_path / "m.txt")


@pytest.mark.parametrize("size, target", [((640, 480), (272, 336)), ((300, 700), (400, 208)), ((33, 17), (64, 48))])
def test_crop_and_resize_equals_the_references_torchvision_calls(size, target):
    """ImageCropAndResize: scale to cover (bilinear, torchvision's resize on PIL), then torchvision's center_crop."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.transforms import InterpolationMode
    import torchvision.transforms.functional as TF

    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    height, width = target
    scale = max(width / image.width, height / image.height)
    expected = TF.resize(image, (round(image.height * scale), round(image.width * scale)),
                         interpolation=InterpolationMode.BILINEAR)
    expected = TF.center_crop(expected, (height, width))
    got = crop_and_resize(image, height, width)
    assert got.size == (width, height) and np.array_equal(np.asarray(got), np.asarray(expected))
    del torchvision


def test_sizes_fixed_and_dynamic(tmp_path):
    write_dataset(tmp_path, sizes=((100, 60), (2000, 1000), (20, 40)))
    meta = str(tmp_path / "metadata.csv")
    dynamic = ImageDataset(DataConfig(str(tmp_path), meta, max_pixels=6400))
    # 100x60 fits and floors to 96x48; 2000x1000 shrinks to 113x56 at 6400 pixels -> 112x48; 20x40 -> 16x32
    assert [dynamic[i]["image"].size for i in range(3)] == [(96, 48), (112, 48), (16, 32)]
    fixed = ImageDataset(DataConfig(str(tmp_path), meta, height=32, width=48, repeat=2))
    assert len(fixed) == 6 and {fixed[i]["image"].size for i in range(6)} == {(48, 32)}
    assert fixed[4]["prompt"] == "prompt 1, with a comma"  # index modulo rows


def test_unreadable_and_missing_images_are_skipped_or_fail_fast(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    write_dataset(tmp_path, extra_rows=[{"image": "broken.png", "prompt": "b"}, {"image": "gone.png", "prompt": "g"}])
    meta = str(tmp_path / "metadata.csv")
    dataset = ImageDataset(DataConfig(str(tmp_path), meta))
    assert dataset.missing == {4}
    items = [dataset[i] for i in range(len(dataset))]
    skipped = [item for item in items if isinstance(item, Skipped)]
    assert [(s.index, Path(s.path).name) for s in skipped] == [(3, "broken.png"), (4, "gone.png")]
    report = skip_report(skipped + skipped[:1])
    assert "skipped 3 sample(s)" in report and "(2 file(s) or row(s))" in report and "broken.png" in report
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) .* do not exist \(strict mode\):\n  .*gone.png"):
        ImageDataset(DataConfig(str(tmp_path), meta, strict=True))
    (tmp_path / "gone.png").write_bytes(b"")
    strict = ImageDataset(DataConfig(str(tmp_path), meta, strict=True))
    with pytest.raises(ValueError, match=r"sample 3: cannot read .*broken.png .*\(strict mode\)"):
        strict[3]


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert epoch_order(10, 3, 1) == epoch_order(10, 3, 1)
    assert sorted(epoch_order(10, 3, 1)) == list(range(10))
    assert epoch_order(10, 3, 1) != epoch_order(10, 3, 2)


def _diffsynth_scheduler():
    """DiffSynth-Studio 2.1.12's FlowMatchScheduler, loaded from its file (its package imports video libraries)."""
    spec = importlib.util.find_spec("diffsynth")
    if spec is None:
        pytest.skip("DiffSynth-Studio is not installed")
    path = Path(spec.submodule_search_locations[0]) / "diffusion" / "flow_match.py"
    module_spec = importlib.util.spec_from_file_location("_diffsynth_flow_match", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    scheduler = module.FlowMatchScheduler("Qwen-Image")
    scheduler.set_timesteps(1000, training=True)
    return scheduler


def test_sigma_table_and_weights_equal_the_reference():
    reference = _diffsynth_scheduler()
    table = sigma_table(0.8)
    assert table.shape == (1000,) and float(table[0]) == 1.0 and abs(float(table[-1]) - 0.02) < 1e-6
    assert torch.allclose(table, reference.sigmas.float(), atol=2e-6)
    weights = bsmntw_weight(table, 0.8)
    assert torch.allclose(weights, reference.linear_timesteps_weights.float(), atol=1e-5)
    assert abs(float(weights.mean()) - 1) < 1e-5 and float(weights[0]) == 0.0


def test_sigma_samplers_draw_what_they_say():
    generator = torch.Generator().manual_seed(0)
    draws = {kind: [draw_sigma(LossConfig(timestep_sampling=kind), generator, 4096) for _ in range(400)]
             for kind in ("reference", "uniform", "logit_normal", "resolution_shift")}
    table = set(sigma_table(0.8).tolist())
    assert all(sigma in table for sigma, _ in draws["reference"])
    assert 0.6 < np.median([s for s, _ in draws["reference"]]) < 0.8  # the shifted table's median is about 0.70
    assert all(0 < s <= 1 for kind in draws for s, _ in draws[kind])
    assert abs(np.median([s for s, _ in draws["logit_normal"]]) - 0.5) < 0.08
    assert abs(np.mean([s for s, _ in draws["uniform"]]) - 0.5) < 0.06
    # 4096 tokens (1024x1024) shift less than the fixed 0.8: mu = 0.5 + 3840 * 0.4 / 7936 = 0.694
    assert np.median([s for s, _ in draws["resolution_shift"]]) < np.median([s for s, _ in draws["reference"]])
    unweighted = draw_sigma(LossConfig(weighting="none"), generator, 16)
    assert unweighted[1] == 1.0
