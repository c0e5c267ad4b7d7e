"""Attacks on training's dataset: malformed rows and metadata files, decompression bombs, any cell value. Each case
asserts the behaviour a user gets (one clear error naming the file, or a counted skip), not merely that nothing
crashed."""

import json
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qistudio.cli.main import main
from test_fuzz_training import cli_args
from test_training_data import write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


# -- dataset rows and metadata ----------------------------------------------------------------------------------------
def bomb_png(path, side=100_000) -> None:
    """A valid PNG header claiming side x side pixels (far past PIL's decompression-bomb limit), no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def attack_files(folder) -> None:
    (folder / "text.png").write_text("this is not an image")
    (folder / "truncated.png").write_bytes((folder / "img0.png").read_bytes()[:60])
    bomb_png(folder / "bomb.png")
    Image.new("RGB", (8, 8)).save(folder / "tiny.png")
    (folder / "a_folder.png").mkdir()



ROW_ATTACKS = [  # (metadata row, what the Skipped reason says)
    ({"image": "", "prompt": "p"}, "image cell is empty"),
    ({"image": None, "prompt": "p"}, "image cell is empty"),
    ({"image": "   ", "prompt": "p"}, "image cell is empty"),
    ({"image": ["img0.png", "img1.png"], "prompt": "p"}, "image cell holds a list"),
    ({"image": [], "prompt": "p"}, "image cell"),
    ({"image": 5, "prompt": "p"}, "image cell must be a file path, got 5"),
    ({"image": {"path": "img0.png"}, "prompt": "p"}, "image cell must be a file path"),
    ({"image": True, "prompt": "p"}, "image cell must be a file path, got True"),
    ({"image": "img0.png", "prompt": ["a", "b"]}, "prompt must be text"),
    ({"image": "img0.png", "prompt": {"en": "a"}}, "prompt must be text"),
    ({"image": "img0.png", "prompt": False}, "prompt must be text"),
    ({"image": "gone.png", "prompt": "p"}, "image: cannot read image"),
    ({"image": "text.png", "prompt": "p"}, "cannot identify image file"),
    ({"image": "truncated.png", "prompt": "p"}, "image: cannot read image"),
    ({"image": "bomb.png", "prompt": "p"}, "is too large to read safely"),
    ({"image": "tiny.png", "prompt": "p"}, "too small to train at"),
    ({"image": "a_folder.png", "prompt": "p"}, "Is a directory"),
    ({"image": "nul\x00byte.png", "prompt": "p"}, "embedded null byte"),
    ({"image": "img0.png", "prompt": "p", "edit_image": [1, 2]}, "edit_image cell must be a file path or a list"),
    ({"image": "img0.png", "prompt": "p", "context_image": ["img1.png"]}, "context_image cell holds a list"),
    ({"image": "img0.png", "prompt": "p", "edit_image": ["img1.png", "gone.png"]}, "edit_image: cannot read image"),
]  # fmt: skip


@pytest.mark.parametrize("row, reason", ROW_ATTACKS, ids=[str(i) for i in range(len(ROW_ATTACKS))])
def test_a_malformed_row_is_skipped_and_counted(tmp_path, row, reason):
    from qistudio.training import DataConfig
    from qistudio.training.data import ImageDataset, Skipped, skip_report

    write_dataset(tmp_path)
    attack_files(tmp_path)
    rows = json.loads((write_dataset(tmp_path, fmt="json")).read_text()) + [row]
    (tmp_path / "metadata.json").write_text(json.dumps(rows))
    keys = ("image", "edit_image", "context_image")
    dataset = ImageDataset(DataConfig(str(tmp_path), str(tmp_path / "metadata.json"), data_file_keys=keys))
    items = [dataset[i] for i in range(len(dataset))]
    assert all(isinstance(item, dict) and item["image"].size[0] >= 16 for item in items[:3])
    skipped = items[3]
    assert isinstance(skipped, Skipped) and skipped.index == 3 and reason in skipped.reason, skipped
    assert "skipped 1 sample(s)" in skip_report([skipped]) and reason in skip_report([skipped])
    strict_config = DataConfig(str(tmp_path), str(tmp_path / "metadata.json"), data_file_keys=keys, strict=True)
    try:
        strict = ImageDataset(strict_config)
    except FileNotFoundError as e:  # strict mode lists the files that are not there before training starts
        assert "do not exist (strict mode)" in str(e) and row["image"] != "img0.png" or "gone" in str(row)
    else:
        with pytest.raises(ValueError, match=r"sample 3: cannot read .*\(strict mode\)"):
            strict[3]


def test_rows_the_request_checks_refuse_are_skipped(tmp_path):
    """EliGen with two entity prompts and three masks: the pipeline's request check refuses it, the row is skipped."""
    import functools

    from qistudio.training import DataConfig
    from qistudio.training.data import ImageDataset, Skipped
    from qistudio.training.encode import sample_request

    write_dataset(tmp_path)
    rows = [{"image": "img0.png", "prompt": "p", "eligen_entity_prompts": ["a", "b"],
             "eligen_entity_masks": ["img1.png", "img1.png", "img1.png"]},
            {"image": "img0.png", "prompt": "p", "eligen_entity_prompts": ["a"], "eligen_entity_masks": ["img1.png"]}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    extra = ("eligen_entity_prompts", "eligen_entity_masks")
    check = functools.partial(sample_request, extra_inputs=extra, zero_cond_t=None)
    dataset = ImageDataset(DataConfig(str(tmp_path), str(tmp_path / "m.json"),
                                      data_file_keys=("image", "eligen_entity_masks")), check)
    assert isinstance(dataset[0], Skipped) and "m.json, sample 0" in dataset[0].path
    assert "entit" in dataset[0].reason and isinstance(dataset[1], dict)
    pickle.dumps(dataset)  # DataLoader workers get a copy: the check must travel


cells = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
         | st.sampled_from(["img0.png", "img1.png", "", " ", "missing.png", "../img0.png", "text.png"]))
cell_values = st.recursive(cells, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                             max_size=2), max_leaves=5)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=cell_values, prompt=cell_values, edit=cell_values)
def test_any_cell_value_gives_a_sample_or_a_skip(tmp_path, image, prompt, edit):
    """Whatever JSON a row holds, the dataset gives a usable sample (a sized RGB image and a text prompt) or a
    Skipped with a reason, never an exception."""
    from qistudio.training import DataConfig
    from qistudio.training.data import ImageDataset, Skipped

    if not (tmp_path / "img0.png").exists():
        write_dataset(tmp_path)
        (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "m.json").write_text(json.dumps([{"image": image, "prompt": prompt, "edit_image": edit}]))
    dataset = ImageDataset(DataConfig(str(tmp_path), str(tmp_path / "m.json"), data_file_keys=("image", "edit_image")))
    item = dataset[0]
    if isinstance(item, Skipped):
        assert item.reason and item.index == 0
    else:
        assert item["image"].mode == "RGB" and isinstance(item["prompt"], str)
        assert item["edit_image"] in (None, "", []) or all(
            isinstance(i, Image.Image) for i in (item["edit_image"] if isinstance(item["edit_image"], list)
                                                 else [item["edit_image"]]))


@pytest.mark.parametrize("name, content, message", [
    ("m.json", "[{\"image\": \"a.png\", \"prompt\": ", r"m.json: not valid JSON \(Expecting value"),
    ("m.json", "{\"image\": \"a.png\", \"prompt\": \"p\"}", "m.json: a .json metadata file must hold a list"),
    ("m.json", "[1, 2]", "m.json: sample 0 needs an 'image' and a 'prompt' field, got 1"),
    ("m.json", "[]", "m.json: the metadata lists no samples"),
    ("m.jsonl", "{\"image\": \"a.png\", \"prompt\": \"p\"}\n{oops}\n", r"m.jsonl: line 2 is not valid JSON"),
    ("m.jsonl", "\n\n", "m.jsonl: the metadata lists no samples"),
    ("m.csv", "image,prompt\na.png," + "x" * 200_000 + "\n", r"m.csv: not a readable CSV file \(field larger"),
    ("m.csv", "", "m.csv: the first line of a .csv must name the columns"),
    ("m.csv", "file,caption\na.png,p\n", "m.csv: the first line of a .csv must name the columns"),
    ("m.csv", "image,caption\na.png,p\n", "m.csv: sample 0 needs an 'image' and a 'prompt' field"),
    ("m.csv", b"image,prompt\na.png,\xff\xfe\n", "m.csv: not UTF-8 text"),
    ("m.txt", "image,prompt\n", "m.txt: metadata must be .csv, .json or .jsonl"),
])  # fmt: skip
def test_bad_metadata_files_are_one_error_naming_the_file(tmp_path, capsys, tiny_repo, name, content, message):
    from qistudio.training.data import read_metadata

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        read_metadata(path)
    args = cli_args(tiny_repo, tmp_path, tmp_path / "out")
    args[args.index("--dataset_metadata_path") + 1] = str(path)
    assert main(args) == 1  # the CLI: one line, before any model loads
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err and "Traceback" not in err


def test_short_and_long_csv_rows_read_as_empty_and_dropped_cells(tmp_path):
    from qistudio.training import DataConfig
    from qistudio.training.data import ImageDataset, Skipped, read_metadata

    write_dataset(tmp_path)
    (tmp_path / "m.csv").write_text("image,prompt\nimg0.png\n,orphan prompt\nimg1.png,p,surplus,cells\n")
    assert read_metadata(tmp_path / "m.csv") == [{"image": "img0.png", "prompt": None},
                                                 {"image": "", "prompt": "orphan prompt"},
                                                 {"image": "img1.png", "prompt": "p"}]
    dataset = ImageDataset(DataConfig(str(tmp_path), str(tmp_path / "m.csv")))
    assert dataset[0]["prompt"] == "" and isinstance(dataset[1], Skipped) and dataset[2]["prompt"] == "p"
