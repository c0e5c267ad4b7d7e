"""Loader attacks: crafted safetensors, non-float and non-finite weights, bad JSON in every file
the loaders read, hostile hub listings (LoRA file attacks: tests/test_fuzz_lora_files.py).

Each attack must end in ONE error of the project's types (CheckpointError, LoRAError, DownloadError) whose
message names the file, and the tensor where one is at fault, through the public paths: ModelConfig +
QwenImagePipeline.from_pretrained with local paths, pipe.load_lora, and `qistudio validate`'s checkpoint_kind.
The files are written byte by byte where the safetensors writer would refuse to produce them.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from qistudio import ModelConfig, QwenImagePipeline
from qistudio.cli.validate import checkpoint_kind
from qistudio.demo import DEMO_DIT
from qistudio.lora import LoRAError
from qistudio.memory.disk import DiskBlockWeights
from qistudio.models.dit import QwenImageDiT
from qistudio.weights.errors import CheckpointError
from qistudio.weights.hub import DownloadError, resolve_files
from qistudio.weights.safetensors_io import read_safetensors_layout
from test_hub import MODEL_ID, FakeHub

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BLOCK_WEIGHT = "transformer_blocks.1.attn.to_q.weight"


# --- helpers ----------------------------------------------------------------------------------------------------


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    """A safetensors file by hand: 8-byte little-endian header length, the header, the data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def load_dit(path, dtype=torch.float32, **config):
    """The public path: a ModelConfig with a local path, loaded by QwenImagePipeline.from_pretrained."""
    return QwenImagePipeline.from_pretrained(torch_dtype=dtype, device="cpu", tokenizer_config=None,
                                             model_configs=[ModelConfig(path=str(path), **config)])


@contextlib.contextmanager
def raises_naming(error_type, path, *fragments):
    """pytest.raises(error_type), and its message names `path` and matches each fragment (across lines)."""
    with pytest.raises(error_type) as info:
        yield info
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert re.search(fragment, message, re.S), (fragment, message)


@pytest.fixture(scope="module")
def dit_state() -> dict[str, torch.Tensor]:
    """The demo DiT's tensors (float32, contiguous)."""
    torch.manual_seed(0)
    return {k: v.detach().clone().contiguous() for k, v in QwenImageDiT(DEMO_DIT).state_dict().items()}


@pytest.fixture(scope="module")
def dit_file(dit_state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dit") / "dit.safetensors"
    save_file(dit_state, str(path))
    return path


@pytest.fixture(scope="module")
def pipe(dit_file):
    return load_dit(dit_file)


@pytest.fixture(scope="module")
def demo(demo_model) -> Path:
    return demo_model


# --- crafted safetensors headers ----------------------------------------------------------------------------------

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
GOOD = {"a": F32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}


def _entry(**changes):
    return {"a": {**F32, **changes}, "b": GOOD["b"]}


# (case id, file bytes, what the message must say besides the file name)
HEADER_ATTACKS = [
    ("empty file", b"", r"not a safetensors file"),
    ("shorter than the length field", b"\x01\x02\x03", r"not a safetensors file"),
    ("header longer than the file", struct.pack("<Q", 1000) + b"{}", r"header claims 1000 bytes"),
    ("absurd header length", struct.pack("<Q", 2**63) + b"{}", r"header claims \d+ bytes"),
    ("list header", safetensors_bytes([1, 2]), r"expected a JSON object, found a JSON list"),
    ("string header", safetensors_bytes("tensors"), r"expected a JSON object, found a string"),
    ("number header", safetensors_bytes(7), r"expected a JSON object, found a number"),
    ("null header", safetensors_bytes(None), r"expected a JSON object, found null"),
    ("non-UTF-8 header", safetensors_bytes(b'{"\xff\xfe": 1}'), r"not UTF-8"),
    ("bad JSON", safetensors_bytes(b'{"a": '), r"not valid JSON: .* line 1 column \d+"),
    ("NaN in the header", safetensors_bytes(b'{"a": NaN}'), r"NaN is not a number JSON allows"),
    ("deeply nested header", safetensors_bytes(b"[" * 100_000), r"nested too deeply|not valid JSON"),
    ("duplicate names", safetensors_bytes(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                                          b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', bytes(16)),
     r"names 'a' twice"),
    ("unknown dtype", safetensors_bytes(_entry(dtype="F4"), bytes(16)), r"tensor 'a' has dtype 'F4'"),
    ("complex dtype", safetensors_bytes(_entry(dtype="C64"), bytes(16)), r"tensor 'a' has dtype 'C64'"),
    ("dtype not a string", safetensors_bytes(_entry(dtype=4), bytes(16)), r"tensor 'a' has dtype 4"),
    ("negative shape", safetensors_bytes(_entry(shape=[-2]), bytes(16)), r"tensor 'a' has shape \[-2\]"),
    ("float shape", safetensors_bytes(_entry(shape=[2.0]), bytes(16)), r"tensor 'a' has shape \[2.0\]"),
    ("bool shape", safetensors_bytes(_entry(shape=[True, True]), bytes(16)), r"tensor 'a' has shape"),
    ("shape not a list", safetensors_bytes(_entry(shape="2"), bytes(16)), r"tensor 'a' has shape '2'"),
    ("no offsets", safetensors_bytes({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), r"'a' has data_offsets None"),
    ("inverted offsets", safetensors_bytes(_entry(data_offsets=[8, 0]), bytes(16)), r"'a' has data_offsets \[8, 0\]"),
    ("negative offsets", safetensors_bytes(_entry(data_offsets=[-8, 0]), bytes(16)), r"'a' has data_offsets"),
    ("three offsets", safetensors_bytes(_entry(data_offsets=[0, 4, 8]), bytes(16)), r"'a' has data_offsets"),
    ("overlapping offsets", safetensors_bytes({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, bytes(16)),
     r"tensors 'a' and 'b' overlap"),
    ("one range for two tensors", safetensors_bytes({"a": F32, "b": F32}, bytes(8)), r"overlap"),
    ("gap between tensors", safetensors_bytes({"a": F32, "b": {**F32, "data_offsets": [12, 20]}}, bytes(20)),
     r"bytes 8-12 before tensor 'b' belong to no tensor"),
    ("bytes after the last tensor", safetensors_bytes(GOOD, bytes(24)), r"8 bytes after the last tensor"),
    ("shape against bytes", safetensors_bytes(_entry(shape=[3]), bytes(16)), r"tensor 'a' is F32 \[3\], which needs "
                                                                             r"12 bytes.* span 8"),
    ("huge shape", safetensors_bytes(_entry(shape=[2**40, 2**40]), bytes(16)), r"tensor 'a' is F32"),
    ("truncated data", safetensors_bytes(GOOD, bytes(12)), r"truncated: tensor 'b' ends at byte 16"),
    ("entry not an object", safetensors_bytes({"a": [1, 2]}), r"corrupt entry for tensor 'a'"),
    ("metadata values not strings", safetensors_bytes({"__metadata__": {"format": 1}, **GOOD}, bytes(16)),
     r"__metadata__ must map names to strings"),
    ("metadata a list", safetensors_bytes({"__metadata__": ["pt"], **GOOD}, bytes(16)), r"__metadata__"),
]
ATTACK_IDS = [case[0] for case in HEADER_ATTACKS]


@pytest.mark.parametrize("name, data, expected", HEADER_ATTACKS, ids=ATTACK_IDS)
def test_crafted_safetensors_as_a_model(name, data, expected, tmp_path):
    path = tmp_path / "transformer.safetensors"
    path.write_bytes(data)
    with raises_naming(CheckpointError, path, expected):
        load_dit(path)


@pytest.mark.parametrize("name, data, expected", HEADER_ATTACKS, ids=ATTACK_IDS)
def test_crafted_safetensors_in_validate(name, data, expected, tmp_path):
    path = tmp_path / "trained.safetensors"
    path.write_bytes(data)
    with raises_naming(CheckpointError, path, expected):
        checkpoint_kind(path)


@pytest.mark.parametrize("name, data, expected", HEADER_ATTACKS, ids=ATTACK_IDS)
def test_crafted_safetensors_as_a_lora(name, data, expected, pipe, tmp_path):
    path = tmp_path / "style.safetensors"
    path.write_bytes(data)
    with raises_naming(LoRAError, path, expected):
        pipe.load_lora(pipe.dit, str(path))
    assert pipe.list_loras() == []


def test_a_shard_named_outside_its_index_folder_is_refused(dit_file, tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    for shard in ("../dit.safetensors", str(dit_file), "a\\b.safetensors"):
        index.write_text(json.dumps({"weight_map": {"img_in.weight": shard}}))
        with raises_naming(CheckpointError, index, r"weight_map names shard"):
            load_dit(index)
    index.write_text(json.dumps({"metadata": {}}))
    with raises_naming(CheckpointError, index, r"needs a non-empty \"weight_map\""):
        load_dit(index)


@pytest.mark.parametrize("payload", [[1, 2], "text", {"w": "not a tensor"}])
def test_a_torch_file_that_is_no_state_dict(payload, tmp_path):
    path = tmp_path / "model.bin"
    torch.save(payload, path)
    with raises_naming(CheckpointError, path, r"holds a list, not a state dict|holds a str|match no known model"):
        load_dit(path)


# --- property tests on the header reader --------------------------------------------------------------------------

DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F4", "X", 3, None])
ENTRIES = st.fixed_dictionaries({
    "dtype": DTYPES,
    "shape": st.one_of(st.lists(st.integers(-2, 5), max_size=3), st.just("x"), st.none()),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 80), min_size=0, max_size=3), st.none()),
})
HEADERS = st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__"]), ENTRIES, max_size=3)


def _outcome_is_clean(path: Path) -> None:
    """Either the file loads (it cannot: no DiT in it) or one CheckpointError names it; the library reads what we
    accept."""
    try:
        header, _ = read_safetensors_layout(path)
    except CheckpointError as e:
        assert str(path) in str(e)
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:  # what we accept, the library reads in full
        for name in header:
            assert list(handle.get_tensor(name).shape) == header[name]["shape"]
    with pytest.raises(CheckpointError) as info:
        load_dit(path)
    assert str(path) in str(info.value)


@FUZZ
@given(header=HEADERS, data_size=st.integers(0, 96))
def test_any_random_header_is_read_or_refused_by_name(header, data_size):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.safetensors"
        path.write_bytes(safetensors_bytes(header, bytes(range(data_size))))
        _outcome_is_clean(path)


@FUZZ
@given(length=st.integers(0, 2**64 - 1), body=st.binary(max_size=200))
def test_any_random_bytes_are_refused_by_name(length, body):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.safetensors"
        path.write_bytes(struct.pack("<Q", length) + body)
        _outcome_is_clean(path)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=6))
def test_random_byte_changes_in_a_real_file_load_or_fail_by_name(flips, dit_file):
    """Bytes changed anywhere (header or weights): it loads with finite weights, or one CheckpointError."""
    data = bytearray(dit_file.read_bytes())
    for position, value in flips:
        data[position % len(data)] = value
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "changed.safetensors"
        path.write_bytes(bytes(data))
        try:
            pipe = load_dit(path)
        except CheckpointError as e:
            assert str(path) in str(e) or "does not fit" in str(e) or "match no known model" in str(e)
            return
        assert all(torch.isfinite(p).all() for p in pipe.dit.parameters())


# --- the finite check itself ---------------------------------------------------------------------------------------

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


@FUZZ
@given(tensors=st.lists(st.tuples(st.sampled_from(FLOATS), st.lists(st.integers(0, 70), max_size=3),
                                  st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["nan", "inf", "-inf"])),
                                           max_size=2)), min_size=1, max_size=6))
def test_finite_check_finds_exactly_the_tensors_with_nan_or_infinity(tensors):
    from qistudio.weights.finite import FiniteCheck

    check, expected = FiniteCheck(), []
    for index, (dtype, shape, pokes) in enumerate(tensors):
        tensor = torch.randn(shape).to(dtype)
        for position, value in pokes if tensor.numel() else []:
            tensor.view(-1)[position % tensor.numel()] = float(value)  # float8_e4m3fn turns infinity into NaN
        check.add(f"t{index}", tensor)
        if not torch.isfinite(tensor.float()).all():
            expected.append(f"t{index}")
    check.add("integers are not weights", torch.arange(3))
    assert check.failures() == expected


# --- weights that are not floats, or not finite -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_or_bool_weights_fail_at_load_naming_the_tensor(dtype, dit_state, tmp_path):
    state = dict(dit_state)
    state["img_in.weight"] = (state["img_in.weight"] * 10).to(dtype)
    path = tmp_path / "ints.safetensors"
    save_file(state, str(path))
    with raises_naming(CheckpointError, path, r"not floating point:\n    img_in\.weight: (I64|I32|U8|BOOL)"):
        load_dit(path)
    torch.save(state, tmp_path / "ints.bin")  # the torch-file path says the same
    with raises_naming(CheckpointError, tmp_path / "ints.bin", r"img_in\.weight: (int64|int32|uint8|bool)"):
        load_dit(tmp_path / "ints.bin")


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_fail_at_load_naming_file_and_tensor(value, file_dtype, dit_state, tmp_path):
    state = {k: v.to(file_dtype, copy=True) for k, v in dit_state.items()}
    state[BLOCK_WEIGHT][3, 5] = value
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    with raises_naming(CheckpointError, path, rf"tensor '{re.escape(BLOCK_WEIGHT)}' holds NaN or infinity"):
        load_dit(path, dtype=torch.bfloat16)


def test_every_non_finite_weight_is_listed(dit_state, tmp_path):
    state = dict(dit_state)
    state["img_in.bias"] = torch.full_like(state["img_in.bias"], float("nan"))
    state["proj_out.weight"] = state["proj_out.weight"].clone()
    state["proj_out.weight"][0, 0] = float("inf")
    path = tmp_path / "two.safetensors"
    save_file(state, str(path))
    with raises_naming(CheckpointError, path, r"2 weights are not finite", r"'img_in\.bias'", r"'proj_out\.weight'"):
        load_dit(path)


def test_a_non_finite_weight_in_a_shard_names_that_shard(demo, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "transformer"
    folder.mkdir()
    shards = sorted((demo / "transformer").glob("*.safetensors"))
    for shard in shards:
        (folder / shard.name).symlink_to(shard)
    (folder / "config.json").symlink_to(demo / "transformer" / "config.json")
    state = load_file(str(shards[1]))
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    (folder / shards[1].name).unlink()
    save_file(state, str(folder / shards[1].name))
    with raises_naming(CheckpointError, folder / shards[1].name, rf"tensor '{re.escape(key)}' holds NaN"):
        load_dit(folder)


def test_values_beyond_the_load_dtype_are_named_as_such(dit_state, tmp_path):
    state = dict(dit_state)
    state[BLOCK_WEIGHT] = state[BLOCK_WEIGHT].clone()
    state[BLOCK_WEIGHT][0, 0] = 1e6  # finite in the file, infinity in float16
    path = tmp_path / "big.safetensors"
    save_file(state, str(path))
    with raises_naming(CheckpointError, path, rf"'{re.escape(BLOCK_WEIGHT)}' holds values up to 1e\+06, beyond "
                                              r"torch.float16's range"):
        load_dit(path, dtype=torch.float16)
    assert load_dit(path, dtype=torch.float32).dit is not None  # as float32 it is fine


def _fp8_state(dit_state, scale) -> dict[str, torch.Tensor]:
    state = dict(dit_state)
    state["img_in.weight"] = (state["img_in.weight"] / 0.01).to(torch.float8_e4m3fn)
    state["img_in.weight_scale"] = scale
    return state


@pytest.mark.parametrize("scale, expected", [
    (torch.tensor(float("nan")), r"tensor 'img_in\.weight_scale' \(the scale of 'img_in\.weight'\) holds NaN"),
    (torch.tensor([float("inf")]), r"tensor 'img_in\.weight_scale' \(the scale of 'img_in\.weight'\) holds NaN"),
    (torch.full((64,), 0.01).index_fill(0, torch.tensor([7]), float("nan")), r"'img_in\.weight_scale'.* holds NaN"),
    (torch.tensor([0.01, 0.01, 0.01]), r"img_in\.weight_scale: scale \[3\] for weight \[64, 64\]"),
    (torch.tensor(1, dtype=torch.int32), r"img_in\.weight_scale: the scale of img_in\.weight is I32, not a float"),
])
def test_fp8_scales_are_checked(scale, expected, dit_state, tmp_path):
    path = tmp_path / "fp8.safetensors"
    save_file(_fp8_state(dit_state, scale), str(path))
    with raises_naming(CheckpointError, path, expected):
        load_dit(path)


def test_a_nan_inside_fp8_weights_is_named(dit_state, tmp_path):
    state = _fp8_state(dit_state, torch.tensor(0.01))
    state["img_in.weight"].view(torch.uint8)[2, 2] = 0x7F  # e4m3fn's NaN
    path = tmp_path / "fp8.safetensors"
    save_file(state, str(path))
    with raises_naming(CheckpointError, path, r"tensor 'img_in\.weight' holds NaN"):
        load_dit(path)
    good = tmp_path / "fp8-good.safetensors"
    save_file(_fp8_state(dit_state, torch.tensor(0.01)), str(good))
    assert torch.isfinite(load_dit(good).dit.img_in.weight).all()


def test_weights_streamed_from_disk_are_checked_on_first_read(dit_state, tmp_path):
    state = dict(dit_state)
    state[BLOCK_WEIGHT] = state[BLOCK_WEIGHT].clone()
    state[BLOCK_WEIGHT][1, 1] = float("nan")
    path = tmp_path / "stream.safetensors"
    save_file(state, str(path))
    pipe = load_dit(path, offload_device="disk")  # block weights stay in the file: not read yet
    disk = pipe.components.disk_sources["dit"]
    healthy = DiskBlockWeights(pipe.dit.transformer_blocks[0], "transformer_blocks.0.", disk)
    healthy.fill(torch.empty(healthy.nbytes, dtype=torch.uint8))
    broken = DiskBlockWeights(pipe.dit.transformer_blocks[1], "transformer_blocks.1.", disk)
    with raises_naming(CheckpointError, path, rf"tensor '{re.escape(BLOCK_WEIGHT)}' holds NaN"):
        broken.fill(torch.empty(broken.nbytes, dtype=torch.uint8))


# --- bad JSON in every file the loaders read ----------------------------------------------------------------------

BAD_JSON = [
    (b"{", r"not valid JSON: .* line 1 column 2"),
    (b"", r"not valid JSON: Expecting value at line 1 column 1"),
    (b"[]", r"expected a JSON object, found a JSON list"),
    (b'{"x": NaN}', r"NaN is not a number JSON allows"),
    (b'{"x": -Infinity}', r"-Infinity is not a number JSON allows"),
    (b'\xff{"x": 1}', r"not UTF-8"),
]


def _variant(demo: Path, root: Path, relative: str, content: bytes) -> Path:
    """The demo model with one file replaced (every other file a symlink to the demo's)."""
    model = root / "model"
    for source in demo.rglob("*"):
        if source.is_file():
            target = model / source.relative_to(demo)
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.relative_to(demo).as_posix() == relative:
                target.write_bytes(content)
            else:
                target.symlink_to(source)
    return model


def _load_part(model: Path, relative: str):
    folder = model / relative.split("/")[0]
    if relative.startswith(("tokenizer/", "processor/")):
        config = ModelConfig(path=str(folder))
        kwargs = {"tokenizer_config": config} if folder.name == "tokenizer" else {"processor_config": config,
                                                                                  "tokenizer_config": None}
        return QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", **kwargs)
    path = model / relative if relative.endswith(".index.json") else folder
    return load_dit(path)


CONFIG_FILES = [
    "transformer/config.json", "vae/config.json", "text_encoder/config.json",
    "transformer/diffusion_pytorch_model.safetensors.index.json", "text_encoder/model.safetensors.index.json",
    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "processor/preprocessor_config.json",
    "processor/tokenizer_config.json",
]


@pytest.mark.parametrize("relative", CONFIG_FILES)
@pytest.mark.parametrize("content, expected", BAD_JSON, ids=["open brace", "empty", "list", "NaN", "-Infinity",
                                                             "non-UTF-8"])
def test_bad_json_in_each_file_the_loaders_read(relative, content, expected, demo, tmp_path):
    model = _variant(demo, tmp_path, relative, content)
    with raises_naming(CheckpointError, model / relative, expected):
        _load_part(model, relative)


@pytest.mark.parametrize("relative, config, expected", [
    ("transformer/config.json", {"axes_dims_rope": "abc"},
     r"axes_dims_rope=\('a', 'b', 'c'\): expected three positive even"),
    ("transformer/config.json", {"axes_dims_rope": [8, 12, 14]}, r"summing to the head size 32"),
    ("vae/config.json", {"latents_mean": [0.0] * 3, "latents_std": [1.0] * 16},
     r"latents_mean has 3 values but z_dim is 16"),
    ("vae/config.json", {"latents_mean": [0.0] * 16, "latents_std": [0.0] * 16},
     r"latents_std must hold positive numbers"),
    ("vae/config.json", {"latents_mean": ["a"] * 16}, r"latents_mean must hold finite numbers"),
    ("text_encoder/config.json", {"vision_config": "tiny"},
     r"cannot build a text_encoder model from .*vision_config"),
])
def test_config_values_that_describe_no_model(relative, config, expected, demo, tmp_path):
    original = json.loads((demo / relative).read_text())
    model = _variant(demo, tmp_path, relative, json.dumps({**original, **config}).encode())
    with raises_naming(CheckpointError, model / relative, expected):
        _load_part(model, relative)


def test_a_tokenizer_json_transformers_cannot_use(demo, tmp_path):
    model = _variant(demo, tmp_path, "tokenizer/tokenizer.json", b'{"model": {"type": "nonsense"}}')
    with raises_naming(CheckpointError, model / "tokenizer", r"cannot load the tokenizer"):
        _load_part(model, "tokenizer/tokenizer.json")


def test_a_truncated_large_tokenizer_json_is_named_with_its_position(demo, tmp_path):
    """Large vocabularies are parsed by us only when transformers fails; the error still names file and place."""
    data = (demo / "tokenizer" / "tokenizer.json").read_bytes()
    assert len(data) > 1 << 20
    model = _variant(demo, tmp_path, "tokenizer/tokenizer.json", data[: len(data) // 2])
    with raises_naming(CheckpointError, model / "tokenizer" / "tokenizer.json", r"not valid JSON: .* line \d+ column"):
        _load_part(model, "tokenizer/tokenizer.json")


# --- hub listings -------------------------------------------------------------------------------------------------

PARTS = st.sampled_from(["a", "b.json", ".", "..", "", "x\\..", "C:", "\x00", "~", "..."])


@FUZZ
@given(names=st.lists(st.lists(PARTS, min_size=1, max_size=4).map("/".join), min_size=1, max_size=3),
       absolute=st.booleans())
def test_any_hub_listing_downloads_inside_the_model_folder_or_is_refused(names, absolute):
    names = ["/" + names[0], *names[1:]] if absolute else names
    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder) / "models"
        fake = FakeHub(dict.fromkeys(names, b"data"))
        config = ModelConfig(model_id=MODEL_ID, origin_file_pattern="", local_model_path=str(models))
        root = (models / MODEL_ID).resolve()
        try:
            paths = resolve_files(config, client=fake)
        except DownloadError as e:
            assert "refusing it" in str(e) and fake.requests == []
        else:
            assert all(root in Path(p).resolve().parents or Path(p).resolve() == root for p in paths)
        written = [p for p in Path(folder).rglob("*") if p.is_file() or p.is_symlink()]
        assert all(root in p.resolve().parents for p in written), written
