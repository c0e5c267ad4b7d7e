"""Attacks on training: crafted resume checkpoints (pickles that would run code), malformed state trees, dataset
rows and metadata, NaN losses, non-finite settings, concurrent and stale runs. Each case asserts the behaviour a
user gets (one clear error naming the problem, or a counted skip), not merely that nothing crashed."""

import json
import math
import os
import pathlib
import pickle
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from qistudio.cli.main import main
from qistudio.training import checkpoint as checkpoint_module
from qistudio.training.checkpoint import (CheckpointWriter, Progress, find_checkpoint, load_checkpoint, optimizer_file,
                                          read_state, rng_file)
from qistudio.training.tree import TREE_KEY, TreeError, flatten, read_tree, unflatten, write_tree
from test_training import model_paths
from test_training_data import write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this creates `marker`: the proof that a load ran code from the file."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def write_pickle_bomb(path, marker) -> None:
    torch.save({"state": {}, "param_groups": [], "trap": Payload(marker)}, path)


def test_the_payload_is_live(tmp_path):
    """The attack files below really would run code if anything unpickled them."""
    marker = tmp_path / "ran"
    write_pickle_bomb(tmp_path / "bomb.pt", marker)
    with open(tmp_path / "bomb.pt", "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.exists()


def cli_args(repo, data, output) -> list[str]:
    paths = [list(p) if isinstance(p, tuple) else p for p in model_paths(repo)]
    return ["train", "--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
            "--model_paths", json.dumps(paths), "--tokenizer_path", str(repo / "tokenizer"), "--device", "cpu",
            "--output_path", str(output), "--lora_base_model", "dit", "--lora_rank", "4"]


def crafted_checkpoint(folder, marker, version, pickles: dict[str, str], safetensors=()) -> pathlib.Path:
    """A checkpoint folder whose state.json claims a partitioned (DeepSpeed) optimizer over one process, holding
    pickle bombs under the given names."""
    folder.mkdir(parents=True)
    state = {"version": version, "partitioned_optimizer": True, "world_size": 1, "config": {},
             "progress": {"step": 1, "epoch": 0, "position": 1, "skipped": []}}
    (folder / "state.json").write_text(json.dumps(state))
    for name in pickles:
        write_pickle_bomb(folder / name, marker)
    for name in safetensors:
        save_file({"w": torch.zeros(1)}, str(folder / name))
    return folder


@pytest.mark.parametrize("version, pickles, safetensors, message", [
    (1, ["optimizer.pt", "optimizer-rank0.pt", "rng-rank0.pt"], ["weights.safetensors"],
     "written by an older qistudio, whose optimizer and random states are pickle files, which are never loaded"),
    (2, ["optimizer.pt", "optimizer-rank0.pt", "rng-rank0.pt"], ["weights.safetensors"],
     r"optimizer.safetensors: missing from the checkpoint"),
    (2, ["optimizer-rank0.pt", "optimizer-rank0.safetensors.pt"], ["weights.safetensors", "optimizer.safetensors"],
     r"optimizer-rank0.safetensors: missing from the checkpoint"),
])  # fmt: skip
def test_a_crafted_checkpoint_cannot_run_code_on_resume(tiny_repo, tmp_path, capsys, version, pickles, safetensors,
                                                         message):
    marker = tmp_path / "code-ran"
    data = tmp_path / "data"
    write_dataset(data)
    checkpoint = crafted_checkpoint(tmp_path / "evil", marker, version, dict.fromkeys(pickles), safetensors)
    assert main(cli_args(tiny_repo, data, tmp_path / "out") + ["--resume", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qistudio train: ") and err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(message, err)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(checkpoint)
    assert not marker.exists()


def test_a_state_file_holding_a_pickle_is_refused(tmp_path):
    """optimizer.safetensors that is really a pickle (renamed .pt): refused by the safetensors reader."""
    marker = tmp_path / "code-ran"
    checkpoint = crafted_checkpoint(tmp_path / "evil", marker, 2, {}, ["weights.safetensors"])
    write_pickle_bomb(checkpoint / "optimizer.safetensors", marker)
    write_pickle_bomb(checkpoint / "optimizer-rank0.safetensors", marker)
    with pytest.raises(ValueError, match=r"optimizer.safetensors: not a readable qistudio state file"):
        load_checkpoint(checkpoint)
    assert not marker.exists()


def write_raw_tree(path, tree, tensors=None) -> None:
    save_file(tensors or {"t": torch.zeros(1)}, str(path), {TREE_KEY: json.dumps(tree)})


@pytest.mark.parametrize("tree, message", [
    ({"object": "os:system", "state": {}}, "names the class os:system, which it may not hold"),
    ({"object": "builtins:eval", "state": {}}, "names the class builtins:eval"),
    ({"enum": "subprocess:Popen", "value": {"value": "touch x"}}, "names the class subprocess:Popen"),
    ({"dataclass": "qistudio.training.checkpoint:Progress", "fields": {}}, "names the class qistudio"),
    ({"dict": {"optimizer": {"tensor": "missing"}, "scheduler": {"value": None}}}, "names a tensor 'missing'"),
    ({"list": {"value": 1}}, "expected a list"),
    ({"float": "1e999999"}, "not a float"),
    ({"value": {"nested": 1}}, "not a scalar"),
    ({"items": [[{"list": []}, {"value": 1}]]}, "a dict key must be a scalar"),
    ({"surprise": 1}, "unknown tree node"),
    ([1, 2], "not a tree node"),
])  # fmt: skip
def test_malformed_or_disallowed_state_trees_are_refused(tmp_path, tree, message):
    checkpoint = crafted_checkpoint(tmp_path / "evil", tmp_path / "m", 2, {}, ["weights.safetensors"])
    write_raw_tree(checkpoint / "optimizer.safetensors", {"dict": {"optimizer": {"value": None},
                                                                   "scheduler": {"value": None}}})
    write_raw_tree(checkpoint / optimizer_file(0), tree)
    with pytest.raises(ValueError, match=r"optimizer-rank0.safetensors: not a readable qistudio state file .*"
                       + message):
        load_checkpoint(checkpoint)
    # the bad optimizer state is not needed without a partitioned optimizer: the shared file is read instead
    (checkpoint / "state.json").write_text((checkpoint / "state.json").read_text().replace('"partitioned_optimizer": true',
                                                                                          '"partitioned_optimizer": false'))
    assert load_checkpoint(checkpoint).optimizer_state is None


@pytest.mark.parametrize("state, message", [
    ("not json", "not a readable checkpoint state"),
    ("[]", "not a checkpoint state"),
    ('{"version": 3}', "format 3 is not 2"),
    ('{"version": 2, "progress": {"step": -1, "epoch": 0, "position": 0, "skipped": []}, "config": {}}', "malformed"),
    ('{"version": 2, "progress": {"step": 1, "epoch": 0, "position": 0, "skipped": [1]}, "config": {}}', "malformed"),
    ('{"version": 2, "progress": {"step": 1, "epoch": 0, "position": 0, "skipped": [], "x": 1}, "config": {}}',
     "malformed"),
    ('{"version": 2, "progress": {"step": 1, "epoch": 0, "position": 0, "skipped": []}, "config": []}', "malformed"),
])  # fmt: skip
def test_malformed_state_json_is_one_error_naming_it(tmp_path, state, message):
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    (folder / "state.json").write_text(state)
    with pytest.raises(ValueError, match=message):
        read_state(folder)
    assert find_checkpoint(tmp_path, str(folder)) == folder


class LossScalerStandIn:
    """What DeepSpeed's loss scaler is to the tree: a plain object with attributes."""

    def __init__(self):
        self.cur_scale, self.cur_iter, self.dynamic = 65536.0, 7, True


def test_a_deepspeed_like_optimizer_state_round_trips_without_pickle(tmp_path, monkeypatch):
    """ZeRO's state dict: a loss scaler object, an int enum, flat fp32 partitions (views), slice mappings with
    dataclasses, integer keys, non-finite floats. Stand-in classes are allowed by name as DeepSpeed's are."""
    import dataclasses
    import enum

    @dataclasses.dataclass
    class FragmentAddress:
        numel: int
        start: int

    class Stage(int, enum.Enum):
        gradients = 2

    for cls in (LossScalerStandIn, FragmentAddress, Stage):
        monkeypatch.setattr(sys.modules[__name__], cls.__name__, cls, raising=False)
        cls.__qualname__ = cls.__name__
    allowed = {f"{__name__}:{c.__name__}" for c in (LossScalerStandIn, FragmentAddress, Stage)}
    monkeypatch.setattr(checkpoint_module, "DEEPSPEED_CLASSES", frozenset(allowed))
    flat = torch.arange(10, dtype=torch.float32)
    state = {"loss_scaler": LossScalerStandIn(), "dynamic_loss_scale": True, "overflow": False, "clip_grad": 0.0,
             "base_optimizer_state": {"state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(4.0)}},
                                      "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]},
             "single_partition_of_fp32_groups": [flat[:6], flat[6:]], "zero_stage": Stage.gradients,
             "group_paddings": [0], "partition_count": [1], "ds_version": "0.18.0",
             "param_slice_mappings": [{"a.weight": FragmentAddress(6, 0)}], "loss": float("inf"), "odd": float("nan")}
    barrier = lambda: None  # noqa: E731
    writer = CheckpointWriter(tmp_path, rank=0, is_main=True, barrier=barrier, partitioned_optimizer=True)
    writer.save(Progress(step=2), {"w": torch.ones(2)}, state, {"last_epoch": 2}, {"python": random.getstate()}, {})
    loaded = load_checkpoint(tmp_path / "step-00000002")
    got = loaded.optimizer_state
    assert isinstance(got["loss_scaler"], LossScalerStandIn) and vars(got["loss_scaler"]) == vars(state["loss_scaler"])
    assert got["zero_stage"] is Stage.gradients and got["param_slice_mappings"] == [{"a.weight": FragmentAddress(6, 0)}]
    assert [t.tolist() for t in got["single_partition_of_fp32_groups"]] == [list(range(6)), [6.0, 7.0, 8.0, 9.0]]
    assert got["base_optimizer_state"]["state"][0]["exp_avg"].tolist() == [1.0] * 3
    assert got["base_optimizer_state"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert got["loss"] == math.inf and math.isnan(got["odd"]) and loaded.rng["python"] == random.getstate()
    monkeypatch.setattr(checkpoint_module, "DEEPSPEED_CLASSES", frozenset())
    with pytest.raises(ValueError, match="LossScalerStandIn, which it may not hold"):
        load_checkpoint(tmp_path / "step-00000002")
    with pytest.raises(checkpoint_module.CheckpointSaveError, match=r"state\['loss_scaler'\] is a LossScalerStandIn"):
        writer.save(Progress(step=3), {"w": torch.ones(2)}, state, {}, {}, {})


def test_no_pickle_loader_is_left_in_the_package():
    root = pathlib.Path(__file__).resolve().parents[1] / "qistudio"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if any(word in p.read_text() for word in ("weights_only=False", "import pickle", "pickle.load"))]
    assert offenders == []


json_leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_trees = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.sampled_from(["tensor", "value", "float", "list", "tuple", "dict", "items",
                                                             "enum", "dataclass", "object", "fields", "state",
                                                             "os:system", "builtins:exec"]), inner, max_size=3),
                          max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(json_trees)
def test_any_json_tree_reads_as_plain_data_or_a_clear_error(tree):
    """Whatever JSON a state file's header holds, reading it builds only plain data or raises TreeError."""
    try:
        value = unflatten(tree, {"t": torch.zeros(1)}, classes=lambda name: False)
    except TreeError:
        return

    def plain(v):
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        if isinstance(v, dict):
            return all(plain(k) and plain(x) for k, x in v.items())
        return v is None or isinstance(v, (bool, int, float, str, torch.Tensor))

    assert plain(value)


optimizer_like = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats() | st.text(max_size=6)
    | st.builds(lambda n: torch.arange(n, dtype=torch.float32), st.integers(0, 4)),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.integers(0, 5) | st.text(max_size=4), inner, max_size=3),
    max_leaves=12)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(optimizer_like)
def test_state_trees_round_trip(tmp_path, value):
    path = write_tree(tmp_path / "state.safetensors", value, classes=lambda name: False)
    back = read_tree(path, classes=lambda name: False)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and torch.equal(a, b)
        if isinstance(a, float):
            return isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b)))
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
        return type(a) is type(b) and a == b

    assert same(value, back)


def test_values_a_tree_cannot_hold_are_refused_with_their_path():
    with pytest.raises(TypeError, match=r"state\['a'\]\[1\] is a set"):
        flatten({"a": [1, {2}]}, {}, lambda name: False)
    with pytest.raises(TypeError, match=r"state\.x is a Payload .*not among the classes"):
        flatten(Box(Payload("nowhere")), {}, lambda name: name.endswith(":Box"))


class Box:
    def __init__(self, x):
        self.x = x


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


from PIL import Image  # noqa: E402

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
    assert f"skipped 1 sample(s)" in skip_report([skipped]) and reason in skip_report([skipped])
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


# -- the trainer: malformed rows on resume, NaN losses, non-finite settings --------------------------------------------
from test_training import base, fresh, make_config, run_killed_at  # noqa: E402,F401 (fixtures)


def malformed_dataset(folder) -> None:
    write_dataset(folder, extra_rows=[{"image": "", "prompt": "empty"}, {"image": 7, "prompt": "number"},
                                      {"image": ["img0.png"], "prompt": "list"}], fmt="json")


def test_malformed_rows_are_skipped_and_counted_on_resume_too(base, tiny_repo, tmp_path):
    from qistudio.training import Trainer

    data = tmp_path / "data"
    malformed_dataset(data)
    options = dict(num_epochs=2, save_steps=2, metadata="metadata.json", data=dict(height=32, width=32))
    straight = Trainer(make_config(tiny_repo, data, tmp_path / "straight", **options), components=fresh(base),
                       progress_bar=False)
    straight.run()
    assert straight.progress.step == 12 and len(straight.progress.skipped) == 6  # 3 bad rows x 2 epochs
    assert {s["reason"] for s in straight.progress.skipped} == {
        "its image cell is empty", "its image cell must be a file path, got 7",
        "its image cell holds a list (['img0.png']); image takes one file path"}

    config = make_config(tiny_repo, data, tmp_path / "killed", **options)
    run_killed_at(base, config, 9)
    resumed = Trainer(config, components=fresh(base), resume="latest", progress_bar=False)
    assert resumed.progress.step == 8
    resumed.run()
    assert resumed.progress.skipped == straight.progress.skipped


def test_a_dataset_with_no_usable_row_stops_with_the_skip_report(base, tiny_repo, tmp_path):
    from qistudio.training import Trainer

    data = tmp_path / "data"
    data.mkdir()
    (data / "m.jsonl").write_text('{"image": "", "prompt": "a"}\n{"image": [1], "prompt": "b"}\n')
    config = make_config(tiny_repo, data, tmp_path / "out", metadata="m.jsonl")
    with pytest.raises(ValueError, match=r"(?s)no sample of a whole epoch could be used; skipped 2 sample\(s\) .*"
                       r"image cell is empty"):
        Trainer(config, components=fresh(base), progress_bar=False).run()
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_a_nan_in_the_models_stops_at_the_first_step_and_saves_nothing(base, tiny_repo, tmp_path):
    from qistudio.training import NonFiniteError, Trainer

    data = tmp_path / "data"
    write_dataset(data)
    components = fresh(base)
    with torch.no_grad():
        components.dit.proj_out.bias[0] = float("nan")  # a damaged checkpoint
    config = make_config(tiny_repo, data, tmp_path / "out", save_steps=1)
    with pytest.raises(NonFiniteError, match=r"^step 1: the loss of the sample with prompt 'prompt \d, with a comma' is "
                       r"nan; the run stops before it reaches the weights\. No checkpoint was saved yet\. Lower "
                       r"--learning_rate \(now 0\.001\)"):
        Trainer(config, components=components, progress_bar=False).run()
    out = tmp_path / "out"
    assert not list(out.glob("*.safetensors")) and not list(out.glob("checkpoints/step-*"))
    assert not (out / ".qistudio-train.lock").exists()  # the lock is given back however the run ends


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_keeps_its_last_checkpoint(base, tiny_repo, tmp_path,
                                                                                          capsys):
    """A learning rate of 1e30 (finite, so accepted) blows the LoRA up at step 1; step 2's loss is not finite."""
    from safetensors.torch import load_file

    from qistudio.training import NonFiniteError, Trainer

    data = tmp_path / "data"
    write_dataset(data)
    config = make_config(tiny_repo, data, tmp_path / "out", save_steps=1, learning_rate=1e30, lr_scheduler="constant")
    trainer = Trainer(config, components=fresh(base), progress_bar=False)
    with pytest.raises(NonFiniteError, match=r"^step 2: the loss of .* is (nan|inf); .* The last checkpoint, "
                       r".*step-00000001, is intact \(--resume continues from it\)\. Lower --learning_rate \(now 1e\+30\)"):
        trainer.run()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["step-1.safetensors"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000001"
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoints/step-00000001/weights.safetensors").values())
    # and the check before each save: weights that hold NaN are never written
    lora = next(p for name, p in trainer.trained_module.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        lora.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"step 1: the trained tensor .*lora_B.* holds NaN or infinity; nothing is "
                       r"saved\. The last checkpoint, .*step-00000001, is intact"):
        trainer.save("nan.safetensors")
    assert not (out / "nan.safetensors").exists() and sorted(os.listdir(out / "checkpoints")) == ["latest",
                                                                                                   "step-00000001"]


def test_the_cli_reports_a_non_finite_loss_in_one_line(tiny_repo, tmp_path, capsys):
    data = tmp_path / "data"
    write_dataset(data)
    args = cli_args(tiny_repo, data, tmp_path / "out") + ["--learning_rate", "1e30", "--lr_scheduler", "constant",
                                                         "--height", "32", "--width", "32", "--max_steps", "3"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("qistudio train: step 2: the loss of ") and "Lower --learning_rate (now 1e+30)" in err


@pytest.mark.parametrize("flag", ["--learning_rate", "--weight_decay", "--lora_alpha", "--vram_limit",
                                  "--validation_cfg_scale"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_non_finite_numbers_are_refused_when_the_arguments_are_read(tiny_repo, tmp_path, capsys, flag, value):
    data = tmp_path / "data"  # never read: the arguments stop first
    with pytest.raises(SystemExit) as exit_:
        main(cli_args(tiny_repo, data, tmp_path / "out") + [f"{flag}={value}"])  # "=": -inf is no option
    assert exit_.value.code == 2
    assert f"argument {flag}: must be a finite number, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("learning_rate", math.inf), ("learning_rate", math.nan),
                                          ("weight_decay", math.nan), ("lora_alpha", math.inf),
                                          ("vram_limit", math.nan), ("validation_cfg_scale", -math.inf)])
def test_non_finite_settings_are_refused_by_the_config_too(tiny_repo, tmp_path, field, value):
    config = make_config(tiny_repo, tmp_path, tmp_path / "out", **{field: value})
    with pytest.raises(ValueError, match=f"{field} must be a finite number, got {value}"):
        config.check()


# -- one run per output folder ----------------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from qistudio.training.lock import acquire
acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_the_same_output_is_refused_until_the_first_is_killed(tiny_repo, tmp_path, capsys, caplog):
    from qistudio.training.lock import LOCK_FILE, acquire, read_holder

    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(data)
    root = pathlib.Path(__file__).resolve().parents[1]
    first = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert first.stdout.readline().strip() == "locked"
        assert main(cli_args(tiny_repo, data, out)) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"qistudio train: another run is writing to {out} (pid {first.pid} on " in err
        assert "give another --output_path" in err and not (out / "training_config.json").exists()
    finally:
        first.kill()  # kill -9: the lock stays behind
        first.wait()
    assert read_holder(out / LOCK_FILE).pid == first.pid
    with caplog.at_level("WARNING"):
        lock = acquire(out)
    assert f"the run that held it (pid {first.pid} on " in caplog.text and "is gone" in caplog.text
    assert read_holder(out / LOCK_FILE).pid == os.getpid()
    lock.release()
    assert not (out / LOCK_FILE).exists()


def live_pid():
    return os.getppid()  # pytest's parent: alive for the whole test


@pytest.mark.parametrize("change, outcome", [
    (dict(pid=None), "live"),  # a live process, its real start time: refused
    (dict(boot_id="a-boot-before-the-last-reboot"), "stale"),
    (dict(started=1), "stale"),  # the pid was reused by a process that started at another time
    (dict(pid=2**22 + 12345, started=None), "stale"),  # beyond pid_max: no such process
    (dict(host="another-machine"), "unknown"),
])  # fmt: skip
def test_a_lock_is_taken_over_only_when_its_run_is_gone(tmp_path, caplog, change, outcome):
    from qistudio.training import RunLockedError
    from qistudio.training.lock import LOCK_FILE, Holder, acquire, process_start, read_holder

    if process_start(os.getpid()) is None:
        pytest.skip("needs Linux's /proc")
    me = Holder.this_process()
    pid = change.get("pid") or live_pid()
    values = {**vars(me), "pid": pid, "started": process_start(pid), **{k: v for k, v in change.items() if k != "pid"}}
    tmp_path.joinpath(LOCK_FILE).write_text(json.dumps(values))
    if outcome == "stale":
        with caplog.at_level("WARNING"):
            acquire(tmp_path).release()
        assert "is gone (killed?); this run takes the lock over" in caplog.text
        assert not (tmp_path / LOCK_FILE).exists()
        return
    message = ("another run is writing to" if outcome == "live" else
               "another run may be writing to .* which cannot be checked from here")
    with pytest.raises(RunLockedError, match=message):
        acquire(tmp_path)
    assert read_holder(tmp_path / LOCK_FILE) == Holder(**values)  # untouched


def test_an_unreadable_lock_is_refused_while_fresh_and_taken_over_when_old(tmp_path, caplog):
    from qistudio.training import RunLockedError
    from qistudio.training.lock import LOCK_FILE, UNREADABLE_GRACE_S, acquire

    lock = tmp_path / LOCK_FILE
    lock.write_text("{half a lock")
    with pytest.raises(RunLockedError, match="names no run readably; if no run is writing to .* delete it"):
        acquire(tmp_path)
    old = lock.stat().st_mtime - UNREADABLE_GRACE_S - 5
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING"):
        acquire(tmp_path).release()
    assert "an unreadable lock file" in caplog.text and not lock.exists()


def test_one_process_shares_its_lock_and_gives_it_back_with_the_last_holder(tmp_path):
    from qistudio.training.lock import LOCK_FILE, acquire

    first = acquire(tmp_path)
    with acquire(tmp_path) as second:
        assert second is first and (tmp_path / LOCK_FILE).exists()
    assert (tmp_path / LOCK_FILE).exists()
    first.release()
    first.release()  # twice is harmless
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_sample_cache_keys_any_row(tmp_path):
    """Cache keys hash each row and its files' sizes: names no file can have, lists and numbers do not stop them."""
    from qistudio.training import DataConfig
    from qistudio.training.cache import row_keys
    from qistudio.training.data import ImageDataset

    write_dataset(tmp_path)
    rows = [{"image": "img0.png", "prompt": "p"}, {"image": "nul\x00byte.png", "prompt": "p"},
            {"image": ["img0.png", 3], "prompt": None}, {"image": 1.5, "prompt": {"a": 1}}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    keys = row_keys(ImageDataset(DataConfig(str(tmp_path), str(tmp_path / "m.json"))), {"format": 1})
    assert len(set(keys)) == 4


def test_training_images_are_read_as_inference_reads_them(tmp_path):
    """A portrait stored sideways with its EXIF orientation, a 16-bit grey ramp, a transparent picture and a mask
    on transparent black: upright, scaled (not clipped white), flattened on white, and kept black."""
    import numpy as np

    from qistudio.training import DataConfig
    from qistudio.training.data import ImageDataset

    stored = Image.new("RGB", (64, 32), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    stored.save(tmp_path / "sideways.jpg", exif=exif.tobytes())
    Image.fromarray(np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))).save(tmp_path / "depth16.png")
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    clear.save(tmp_path / "clear.png")
    rows = [{"image": "sideways.jpg", "prompt": "p"}, {"image": "depth16.png", "prompt": "p"},
            {"image": "clear.png", "prompt": "p", "blockwise_controlnet_inpaint_mask": "clear.png"}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    keys = ("image", "blockwise_controlnet_inpaint_mask")
    dataset = ImageDataset(DataConfig(str(tmp_path), str(tmp_path / "m.json"), data_file_keys=keys))
    assert dataset[0]["image"].size == (32, 64)  # upright: a portrait
    ramp = np.asarray(dataset[1]["image"])[0, :, 0]
    assert ramp[0] < 20 and 100 < ramp[16] < 160 and ramp[-1] > 235  # a ramp, not white
    with pytest.warns(UserWarning, match="alpha channel; it is flattened on white"):
        sample = dataset[2]
    assert np.asarray(sample["image"]).min() == 255 and np.asarray(sample["blockwise_controlnet_inpaint_mask"]).max() == 0
