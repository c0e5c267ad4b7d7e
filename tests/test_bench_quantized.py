"""bench/quantized.py: the one-H100 command its docstring gives parses to half the blocks at full width, and its
--smoke run goes through every file type on the CPU (tiny 256-wide DiT: Q4_K_M's K-quant rows apply)."""

import sys

import pytest

from conftest import ROOT

pytest.importorskip("gguf")
sys.path.insert(0, str(ROOT))

from bench import quantized  # noqa: E402
from qistudio.weights.gguf_io import read_gguf_layout  # noqa: E402


def test_the_documented_h100_command_runs_half_the_blocks_at_full_width():
    command = "python bench/quantized.py --blocks 30 --runs 5"
    assert command in quantized.__doc__
    args = quantized.parse(command.split()[2:])
    assert (args.blocks, args.full_blocks, args.runs) == (30, 60, 5) and args.scale.dit["num_layers"] == 30
    assert args.scale.height == args.scale.width == 1328 and args.types == ["Q8_0", "Q4_K_M", "NF4"]
    with pytest.raises(SystemExit):
        quantized.parse(["--blocks", "61"])


@pytest.mark.usefixtures("one_thread")
def test_smoke_run_on_the_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    quantized.main(["--smoke", "--blocks", "1", "--work", str(tmp_path / "work")])
    table = (tmp_path / "quantized.md").read_text()
    assert "smoke run: a tiny 256-wide DiT, 1 of the model's 2 blocks" in table
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("| ")]
    sides = {(row[0], row[1]): row for row in rows[1:]}
    assert set(sides) == {("bf16 (resident)", "qistudio"), ("Q8_0", "qistudio"), ("Q8_0", "diffusers"),
                          ("Q4_K_M", "qistudio"), ("Q4_K_M", "diffusers"), ("NF4", "qistudio"), ("NF4", "diffusers")}
    for qtype in ("Q8_0", "Q4_K_M"):  # the same file, the same numbers as diffusers'
        ours_error = float(sides[(qtype, "qistudio")][9].split("/")[0])
        assert ours_error < 1e-5 and sides[(qtype, "qistudio")][6].endswith("n=1)")
    assert "needs a GPU" in sides[("NF4", "diffusers")][2]
    written = read_gguf_layout(tmp_path / "work" / "transformer" / "dit-Q4_K_M.gguf")[0]
    assert "Q4_K" in {tensor.type_name for tensor in written.values()}
