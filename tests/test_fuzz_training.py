"""Attacks on training's checkpoints: crafted resume checkpoints (pickles that would run code), malformed state
trees and state files. Each case asserts the behaviour a user gets (one clear error naming the problem), not merely
that nothing crashed. Dataset attacks: tests/test_fuzz_training_data.py; runs: tests/test_fuzz_training_runs.py."""

import json
import math
import pathlib
import random
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from qistudio.cli.main import main
from qistudio.training import checkpoint as checkpoint_module
from qistudio.training.checkpoint import (CheckpointWriter, Progress, find_checkpoint, load_checkpoint, optimizer_file,
                                          read_state)
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
