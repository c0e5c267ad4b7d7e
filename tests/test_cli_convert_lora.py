"""`qistudio convert-lora` on a tiny DiT: round trips keep the output, bad paths, failures that write nothing."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import rel_err
from lora_files import TARGETS, Inputs, down_up_layout, kohya_layout, our_dit, peft_layout, random_pairs
from qistudio.cli.main import main
from qistudio.lora import FORMATS, load_lora, unload_lora
from tiny_models import reference_dit


def cli(*args) -> int:
    """main(args) as the console script sees it: argparse's own errors exit through SystemExit."""
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def dit():
    return our_dit(reference_dit())


@pytest.fixture(scope="module")
def inputs():
    return Inputs()


@pytest.fixture
def lora(tmp_path, dit):
    """A kohya-layout LoRA for the tiny DiT."""
    path = tmp_path / "in.safetensors"
    save_file(kohya_layout(random_pairs(dit)), path)
    return path


def loha_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {f"lycoris_img_in.hada_w{i}_{ab}": torch.randn(*((64, 2) if ab == "a" else (2, 64)), generator=g)
             for i in (1, 2) for ab in "ab"}
    state["lycoris_img_in.alpha"] = torch.tensor(1.0)
    return state


def output_with(dit, inputs, path) -> torch.Tensor:
    load_lora(dit, path, alpha=0.7)
    try:
        return inputs.ours(dit)
    finally:
        unload_lora(dit)


LAYOUTS = {
    "kohya": lambda pairs: kohya_layout(pairs),
    "comfyui": lambda pairs: down_up_layout(pairs, prefix="diffusion_model."),
    "diffsynth": lambda pairs: peft_layout(pairs, adapter="default"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_round_trip_to_every_format_keeps_the_output(dit, inputs, tmp_path, capsys, layout):
    source = tmp_path / f"{layout}.safetensors"
    save_file(LAYOUTS[layout](random_pairs(dit, seed=len(layout))), source)
    expected = output_with(dit, inputs, source)
    for to in FORMATS:
        out = tmp_path / "out" / f"{to}.safetensors"
        out.parent.mkdir(exist_ok=True)
        assert cli("convert-lora", source, out, "--to", to) == 0
        captured = capsys.readouterr()
        tensors = 3 * len(TARGETS) if to == "comfyui" else 2 * len(TARGETS)  # comfyui keeps .alpha
        assert captured.out.strip() == f"wrote {out}: {len(TARGETS)} layers, {tensors} tensors, {to} format"
        assert captured.err == ""
        assert len(load_file(out)) == tensors
        assert rel_err(output_with(dit, inputs, out), expected) <= 1e-5
    assert sorted(os.listdir(tmp_path / "out")) == [f"{to}.safetensors" for to in sorted(FORMATS)]


def test_to_is_required_and_checked(lora, tmp_path, capsys):
    assert cli("convert-lora", lora, tmp_path / "out.safetensors") == 2
    assert "--to" in capsys.readouterr().err
    assert cli("convert-lora", lora, tmp_path / "out.safetensors", "--to", "kohya") == 2
    assert "'kohya'" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_missing_or_unreadable_input(tmp_path, capsys):
    missing = tmp_path / "nowhere.safetensors"
    assert cli("convert-lora", missing, tmp_path / "out.safetensors", "--to", "diffusers") == 2
    err = capsys.readouterr().err
    assert f"IN {missing}: no such file" in err and "usage:" in err
    assert cli("convert-lora", tmp_path, tmp_path / "out.safetensors", "--to", "diffusers") == 2
    assert f"IN {tmp_path}: is a folder" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_input_that_cannot_be_read(lora, tmp_path, capsys, monkeypatch):
    import qistudio.cli.convert_lora as command

    def denied(path, *args, **kwargs):  # as open() fails on a file without read permission (root reads any)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(command, "open", denied, raising=False)
    assert cli("convert-lora", lora, tmp_path / "out.safetensors", "--to", "diffusers") == 2
    assert f"IN {lora}: cannot be read (Permission denied)" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_output_must_be_safetensors_in_an_existing_folder(lora, tmp_path, capsys):
    assert cli("convert-lora", lora, tmp_path / "out.pt", "--to", "comfyui") == 2
    assert f"OUT {tmp_path / 'out.pt'}: the output must end in .safetensors" in capsys.readouterr().err
    deep = tmp_path / "no" / "such" / "out.safetensors"
    assert cli("convert-lora", lora, deep, "--to", "comfyui") == 2
    assert f"the folder {tmp_path / 'no' / 'such'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists() and not (tmp_path / "out.pt").exists()


def test_output_may_not_be_the_input(lora, tmp_path, capsys):
    before = lora.read_bytes()
    for same in (lora, tmp_path / "." / lora.name):
        assert cli("convert-lora", lora, same, "--to", "diffsynth", "--overwrite") == 2
        assert f"OUT {same}: is the input file" in capsys.readouterr().err
    link = tmp_path / "link.safetensors"
    link.symlink_to(lora)
    assert cli("convert-lora", lora, link, "--to", "diffsynth", "--overwrite") == 2
    assert f"OUT {link}: is the input file" in capsys.readouterr().err
    assert lora.read_bytes() == before


def test_existing_output_needs_overwrite(lora, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_text("an older file")
    assert cli("convert-lora", lora, out, "--to", "diffusers") == 2
    assert f"OUT {out}: already exists; add --overwrite" in capsys.readouterr().err
    assert out.read_text() == "an older file"
    assert cli("convert-lora", lora, out, "--to", "diffusers", "--overwrite") == 0
    assert f"wrote {out}:" in capsys.readouterr().out
    assert all(k.startswith("transformer.") for k in load_file(out))


def test_failed_conversion_prints_one_line_and_writes_nothing(tmp_path, capsys):
    source = tmp_path / "loha.safetensors"
    save_file(loha_state(), source)
    out = tmp_path / "out.safetensors"
    assert cli("convert-lora", source, out, "--to", "diffusers") == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qistudio convert-lora: ")
    assert "loha layer cannot be written for diffusers" in lines[0] and "Traceback" not in captured.err
    assert captured.out == ""
    assert sorted(os.listdir(tmp_path)) == ["loha.safetensors"]  # no output, no temporary file
    # With --overwrite an existing output stays as it was; comfyui keeps LoHa and succeeds.
    out.write_text("kept")
    assert cli("convert-lora", source, out, "--to", "diffsynth", "--overwrite") == 1
    assert out.read_text() == "kept"
    capsys.readouterr()
    assert cli("convert-lora", source, out, "--to", "comfyui", "--overwrite") == 0
    assert "1 layers, 5 tensors, comfyui format" in capsys.readouterr().out


def test_not_a_lora_or_corrupt_file_fails_cleanly(tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, other)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not js")
    for source, reason in ((other, "none of the 1 tensors is a LoRA layer"), (corrupt, str(corrupt))):
        out = tmp_path / "out.safetensors"
        assert cli("convert-lora", source, out, "--to", "comfyui") == 1
        err = capsys.readouterr().err
        assert err.startswith(f"qistudio convert-lora: cannot convert {source} to comfyui: ") and reason in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["corrupt.safetensors", "other.safetensors"]


def test_warnings_become_notes(tmp_path, capsys):
    state = {"lora_te_model_layers_3_self_attn_q_proj.lora_down.weight": torch.zeros(4, 16),
             "lora_te_model_layers_3_self_attn_q_proj.lora_up.weight": torch.zeros(16, 4),
             "img_in.lora_A.weight": torch.zeros(4, 64), "img_in.lora_B.weight": torch.zeros(64, 4)}
    source, out = tmp_path / "te.safetensors", tmp_path / "out.safetensors"
    save_file(state, source)
    assert cli("convert-lora", source, out, "--to", "diffsynth") == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == ("qistudio convert-lora: note: 2 text-encoder tensors are left out: a diffsynth "
                                    "file holds the DiT only (first: lora_te_model_layers_3_self_attn_q_proj."
                                    "lora_down.weight)")
    assert "1 layers, 2 tensors, diffsynth format" in captured.out
    assert set(load_file(out)) == {"img_in.lora_A.default.weight", "img_in.lora_B.default.weight"}
