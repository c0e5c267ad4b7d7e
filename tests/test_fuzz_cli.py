"""Attacks on the command line: each bad argument or file ends in one `qistudio COMMAND: ...` line, a non-zero
status and no traceback. Argument errors must be found before any model loads (status 2, no "loading" line); the
few cases that need a model folder use the offline demo model with one file broken."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from qistudio.cli.main import main

# A real argv never holds NUL or lone surrogates (the shell passes bytes; Python decodes them with
# surrogateescape, and our messages print with repr where a value may be binary).
ARGV_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


def run_cli(capsys, *args) -> tuple[int, str]:
    """main(args) as the console script runs it: (exit status, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_message(code: int, err: str, expected: str | None = None, status: int | None = None) -> None:
    assert "Traceback" not in err, err
    assert code not in (0, None), err
    if status is not None:
        assert code == status, err
    messages = [line for line in err.splitlines() if line.startswith("qistudio")]
    assert len(messages) == 1, err  # argparse's usage lines start with "usage:" or spaces
    if expected is not None:
        assert expected in messages[0], err


# ------------------------------------------------------------------------------------ files to attack with


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("attack")
    made = {
        "text.png": b"this is not an image\n",
        "empty.png": b"",
        "truncated.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00",
        "empty.safetensors": b"",
        "text.safetensors": b"hello world, not a tensor file",
        "huge-header.safetensors": struct.pack("<Q", 2**62) + b"{}",
        "list-header.safetensors": struct.pack("<Q", 2) + b"[]",
        "bad-json.safetensors": struct.pack("<Q", 5) + b"{nope",
        "overrun.safetensors": _header({"a.lora_A.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}),
    }
    for name, data in made.items():
        (folder / name).write_bytes(data)
    Image.new("RGB", (64, 64), "white").save(folder / "white.png")
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 7),
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(7, 2)}, folder / "misfit-lora.safetensors")
    (folder / "a-folder.png").mkdir()
    return {name: folder / name for name in [*made, "white.png", "misfit-lora.safetensors", "a-folder.png"]}


def _header(header: dict) -> bytes:
    """A safetensors file whose header promises more bytes than follow."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"\x00" * 8


# ------------------------------------------------------------------------------------ generate: arguments

GENERATE_ATTACKS = [
    # -o
    (["-o", "{tmp}/no/such/folder/o.png"], "does not exist"),
    (["-o", "{tmp}"], "must be a .png"),
    (["-o", "{tmp}/o.jpg"], "must be a .png"),
    (["-o", "{tmp}/o"], "must be a .png"),
    (["-o", ""], "must be a .png"),
    (["-o", "{files}/a-folder.png"], "is a folder"),
    (["-o", "{files}/text.png/o.png"], "is not a folder"),
    # numbers
    (["--cfg", "nan"], "must be a finite number"),
    (["--cfg", "inf"], "must be a finite number"),
    (["--cfg=-inf"], "must be a finite number"),
    (["--cfg", "four"], "expected a number"),
    (["--steps=-1"], "must be >= 1"),
    (["--steps", "0"], "must be >= 1"),
    (["--steps", "2.5"], "expected a whole number"),
    (["--steps", "nan"], "expected a whole number"),
    (["--size", "99999x99999"], "must be in [16, 16384]"),
    (["--size", "0x0"], "must be in [16, 16384]"),
    (["--size=-64x64"], "expected WIDTHxHEIGHT"),
    (["--size", "1e3x1e3"], "expected WIDTHxHEIGHT"),
    (["--size", "nan"], "expected WIDTHxHEIGHT"),
    (["--seed=-1"], "must be in [0, 2**64)"),
    (["--seed", str(2**64)], "must be in [0, 2**64)"),
    (["--seed", "0x10"], "expected a whole number"),
    (["--strength", "nan", "--input-image", "{files}/white.png"], "must be in (0, 1]"),
    (["--strength", "0", "--input-image", "{files}/white.png"], "must be in (0, 1]"),
    (["--strength", "0.5"], "--strength needs --input-image"),
    (["--vram-limit", "nan"], "must be >= 0 GiB"),
    (["--vram-limit=-1"], "must be >= 0 GiB"),
    # files
    (["--input-image", "{tmp}/missing.png"], "cannot read image"),
    (["--input-image", "{files}/text.png"], "cannot read image"),
    (["--input-image", "{files}/empty.png"], "cannot read image"),
    (["--input-image", "{files}/truncated.png"], "cannot read image"),
    (["--input-image", "{files}/a-folder.png"], "cannot read image"),
    (["--edit-image", "{files}/text.png"], "cannot read image"),
    (["--inpaint-mask", "{tmp}/missing.png"], "cannot read image"),
    (["--context-image", "{files}/empty.png"], "cannot read image"),
    (["--control", "canny:{tmp}/missing.png"], "cannot read image"),
    (["--control", "sketch:{files}/white.png"], "expected KIND:PATH[:SCALE]"),
    (["--control", "inpaint:{files}/white.png"], "needs --inpaint-mask"),
    (["--controlnet", "canny"], "expected KIND=SOURCE"),
    (["--entity", "a cat"], "give one mask per entity"),
    (["--entity-mask", "{files}/text.png", "--entity", "a cat"], "cannot read image"),
    (["--lora", "{tmp}/missing.safetensors:0.5"], "no such file or folder"),
    (["--from-png", "{tmp}/missing.png"], "--from-png"),
    (["--from-png", "{files}/text.png"], "--from-png"),
    (["--from-png", "{files}/white.png"], "carries no qistudio generation parameters"),
    # the rest
    (["--dtype", "float64"], "invalid choice"),
    (["--device", "nonsense"], "--device nonsense"),
    (["--scheduler", "euler"], "invalid choice"),
    (["--download-source", "ftp"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
]


@pytest.mark.parametrize("args, expected", GENERATE_ATTACKS, ids=[" ".join(a) for a, _ in GENERATE_ATTACKS])
def test_generate_argument_attacks_fail_before_loading(args, expected, files, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, files=files["white.png"].parent) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.png")]
    # A model folder that does not exist: had loading started, its error would show instead.
    code, err = run_cli(capsys, "generate", "a fox", "--model", tmp_path / "absent", *args)
    assert_one_message(code, err, expected, status=2)
    assert "loading" not in err and not (tmp_path / "out.png").exists()


def test_an_unwritable_output_folder_is_found_before_loading(tmp_path, capsys):
    if sys.platform != "linux" or not Path("/sys").is_dir():
        pytest.skip("needs a folder that even root cannot write into (Linux /sys)")
    code, err = run_cli(capsys, "generate", "a fox", "--model", tmp_path / "absent", "-o", "/sys/out.png")
    assert_one_message(code, err, "cannot write into the folder /sys", status=2)


def test_an_empty_prompt_is_refused(tmp_path, capsys):
    code, err = run_cli(capsys, "generate", "", "-o", tmp_path / "o.png")
    assert_one_message(code, err, "a prompt is needed", status=2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["--size", "--steps", "--cfg", "--seed", "--strength", "--vram-limit", "--lora",
                             "--control", "--controlnet", "--dtype", "--scheduler", "--attention"]),
       value=ARGV_TEXT)
def test_any_flag_value_gives_a_result_or_one_message(flag, value, tmp_path, capsys):
    """Whatever the value, argument checking ends cleanly: a bad one in one message (status 2); a good one reaches
    loading, which fails on the absent model folder in one message (status 1)."""
    code, err = run_cli(capsys, "generate", "a fox", "--model", tmp_path / "absent", f"{flag}={value}",
                        "-o", tmp_path / "o.png")
    assert_one_message(code, err)
    assert code in (1, 2) and (code == 2 or "no such model folder" in err)


# ------------------------------------------------------------------------------------ validate and convert-lora

VALIDATE_ATTACKS = [
    (["{tmp}/missing.safetensors"], "no such file"),
    (["{files}/empty.safetensors"], "not a readable safetensors file"),
    (["{files}/text.safetensors"], "not a readable safetensors file"),
    (["{files}/huge-header.safetensors"], "not a readable safetensors file"),
    (["{files}/list-header.safetensors"], "not a readable safetensors file"),
    (["{files}/bad-json.safetensors"], "not a readable safetensors file"),
    (["{files}/overrun.safetensors"], "not a readable safetensors file"),
    (["{files}/white.png"], "not a readable safetensors file"),
    (["{files}/a-folder.png"], "no such file"),
    (["{lora}", "--control", "{files}/white.png"], "need a ControlNet checkpoint"),
    (["{lora}", "--edit-image", "{files}/text.png"], "--edit-image: cannot read image"),
    (["{lora}", "-o", "{files}/white.png"], "is a file"),
    (["{lora}", "-o", "{files}/text.png/sub"], "cannot create the folder"),
    (["{lora}", "--cfg", "nan"], "must be a finite number"),
    (["{lora}", "--steps", "0"], "must be >= 1"),
    (["{lora}", "--seed=-5"], "must be in [0, 2**64)"),
    (["{lora}", "--size", "7x7"], "must be in [16, 16384]"),
    (["{lora}", "--device", "cuda:99"] if not torch.cuda.is_available() else ["{lora}", "--device", "nonsense"],
     "--device"),
    (["{lora}", "--model", "{tmp}/absent"], "no such model folder"),
    (["{lora}", "--model", "not a hub id"], "not a hub id"),
]


@pytest.mark.parametrize("args, expected", VALIDATE_ATTACKS, ids=[" ".join(a) for a, _ in VALIDATE_ATTACKS])
def test_validate_attacks_fail_before_loading(args, expected, files, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, files=files["white.png"].parent, lora=files["misfit-lora.safetensors"])
            for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "validation")]
    code, err = run_cli(capsys, "validate", *args)
    assert_one_message(code, err, expected, status=2)
    assert "loading" not in err


@pytest.mark.parametrize("name, expected", [
    ("text.safetensors", "cannot convert"), ("list-header.safetensors", "cannot convert"),
    ("huge-header.safetensors", "cannot convert"), ("empty.safetensors", "cannot convert"),
    ("white.png", "cannot convert"),
])  # fmt: skip
def test_convert_lora_on_garbage_writes_nothing(name, expected, files, tmp_path, capsys):
    code, err = run_cli(capsys, "convert-lora", files[name], tmp_path / "out.safetensors", "--to", "diffusers")
    assert_one_message(code, err, expected, status=1)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("out, expected", [
    ("{tmp}/out.bin", "must end in .safetensors"), ("{tmp}/no/out.safetensors", "does not exist"),
    ("{files}/text.png/out.safetensors", "is not a folder"),
])  # fmt: skip
def test_convert_lora_output_attacks(out, expected, files, tmp_path, capsys):
    out = out.format(tmp=tmp_path, files=files["white.png"].parent)
    code, err = run_cli(capsys, "convert-lora", files["misfit-lora.safetensors"], out, "--to", "comfyui")
    assert_one_message(code, err, expected, status=2)


# ------------------------------------------------------------------------------------ failures after loading


@pytest.fixture(scope="module")
def broken_model(demo_model, tmp_path_factory) -> Path:
    """The demo model with one transformer shard replaced by garbage."""
    broken = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(demo_model, broken)
    shard = sorted((broken / "transformer").glob("*.safetensors"))[0]
    shard.write_bytes(b"\x00" * 100)
    return broken


def test_generate_with_a_broken_model_file(broken_model, tmp_path, capsys):
    code, err = run_cli(capsys, "generate", "a fox", "--model", broken_model, "--size", "32x32", "--steps", "1",
                        "-o", tmp_path / "o.png")
    assert_one_message(code, err, "could not load the model", status=1)
    assert not (tmp_path / "o.png").exists()


def test_validate_with_a_broken_model_file(broken_model, files, tmp_path, capsys):
    code, err = run_cli(capsys, "validate", files["misfit-lora.safetensors"], "--model", broken_model,
                        "--size", "32x32", "--steps", "1", "-o", tmp_path / "v")
    assert_one_message(code, err, "qistudio validate: ", status=1)
    assert "transformer" in err and not list((tmp_path / "v").iterdir())


def test_validate_with_a_lora_that_does_not_fit(demo_model, files, tmp_path, capsys):
    code, err = run_cli(capsys, "validate", files["misfit-lora.safetensors"], "--model", demo_model,
                        "--size", "32x32", "--steps", "1", "-o", tmp_path / "v")
    assert_one_message(code, err, "does not fit the model", status=1)
    assert ":;" not in err and not list((tmp_path / "v").iterdir())


def test_generate_with_a_lora_that_does_not_fit(demo_model, files, tmp_path, capsys):
    code, err = run_cli(capsys, "generate", "a fox", "--model", demo_model, "--lora", files["misfit-lora.safetensors"],
                        "--size", "32x32", "--steps", "1", "-o", tmp_path / "o.png")
    assert_one_message(code, err, "could not apply LoRA", status=1)
    assert not (tmp_path / "o.png").exists()
